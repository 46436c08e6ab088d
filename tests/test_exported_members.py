"""Public API is declared once per package; this pins it (like httpx's test of the same name).

It also pins the exception trees: one root per package, every exported error below it, every
error type exported by exactly one module, and each package docstring's drawing of its tree.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

import pytest

PUBLIC = {
    "sottovoce": ["ClockError", "SottovoceError", "__version__"],
    "sottovoce.policy": [
        "Accountant", "Action", "AgeGate", "AgeRestricted", "Aggregator", "AggregatorKey",
        "BudgetExhausted", "Change", "Checkpoint", "CheckpointError", "CheckpointSigner",
        "ConsentMissing", "ConsentMode", "ConsentState", "ConsistencyProofError", "DataClass",
        "Decision", "DecisionEngine", "DecisionLog", "DeviceCap", "InclusionProof",
        "InclusionProofError",
        "InvalidPolicy", "LogError", "Outcome", "PURPOSE_DATA", "Policy", "PolicyError",
        "PolicyViolation", "PrivacyBudget", "PrivacyMode", "Problem", "ProofError", "Purpose",
        "REASONS", "REASON_CODES", "Reason", "Region", "ResidencyViolation", "UnknownRegion",
        "VerifyReport", "consent_allows", "consent_refusal", "diff_policies", "example_policy",
        "example_policy_path", "format_diff", "format_duration", "leaf_hash", "load_policy",
        "open_checkpoint", "parse_policy", "parse_verifier_key", "policy_from_data", "reason",
        "render_report", "verify_consistency", "verify_inclusion",
    ],
    "sottovoce.device": [
        "AppendResult", "COMPLETION_FRACTION", "CatalogError", "CatalogItem", "Context",
        "DeviceError", "Dislike", "Durability", "EARLY_SKIP_MS", "Eligibility", "Event",
        "EventConflict", "EventStore", "FEATURES", "ITEM_DIM", "InvalidEvent", "InvalidEventBatch",
        "InvalidInput", "Like", "LocalRound", "ModelWeights", "Navigate", "NotEligible",
        "PARAMETER_COUNT",
        "Pause", "Personalizer", "PlayEnd", "PlayStart", "PurgeReport", "QUALIFIED_PLAY_MS",
        "RankedItem", "Ranker", "RankerError", "Ranking", "RerankOptions", "Resume",
        "SCHEMA_VERSION", "SESSION_GAP_MS", "Search", "Seek", "Skip", "StoreCorrupt", "StoreError",
        "StoreFull",
        "TASTE_HALF_LIFE_MS", "check_builtin_only", "from_ms", "is_completion", "is_play", "to_ms",
    ],
    "sottovoce.sync": [
        "Acknowledged", "AggregatorUnavailable", "AttemptOutcome", "BadSignature", "Charge",
        "DeltaState", "Drop",
        "EnrollmentRefused", "Malformed", "ModelRelease", "NOISE_SLACK_SIGMAS", "NonFinite",
        "Mechanism", "NormExceeded", "OpenedDelta", "Outbox", "OutboxItem",
        "PROTOCOL_VERSION",
        "RetryAt", "RoundClosed", "RoundSpec", "SealedDelta", "SignedRoundSpec", "SpecRefused",
        "SyncError", "Undecryptable", "UnsupportedProtocol", "WrongModel", "WrongModelVersion",
        "WrongRegion", "add_noise", "backoff", "charge_for", "check_budget", "check_spec", "clip",
        "decide", "device_noise_std", "epsilon", "mechanism",
        "idempotency_key", "new_device_secret", "open_delta", "period_label", "pseudonym",
        "sample_into_round", "seal_delta", "sign_release", "sign_round_spec", "verify_release",
        "verify_round_spec",
    ],
    "sottovoce.aggregator": [
        "AggregationError", "AggregatorError", "DatabaseUnavailable", "LedgerEntry", "PartialSum",
        "PrivacyLedger", "RefusalLimit", "RegionAggregator", "RegionKeys", "RoundInfo",
        "RoundOverBudget", "RoundScheduler", "RoundStillOpen", "SCHEMA_VERSION", "SchemaTooNew",
        "Verdict", "ServiceConfig", "ServiceConfigError", "build_app", "central_release",
        "create_app", "epsilon_of", "generate_keys", "load_keys", "migrate", "open_database",
    ],
    "sottovoce.sim": [
        "Dataset", "DatasetError", "Interaction", "PopularityRanker", "RandomRanker",
        "SimulationConfig", "SimulationError", "build_item_vectors", "candidate_pools",
        "default_lastfm_path", "evaluate", "hr_at_k", "load_interactions_csv", "load_lastfm", "mrr",
        "ndcg_at_k", "simulate", "split_holdout", "write_report",
    ],
}  # fmt: skip

ROOTS = {
    "sottovoce.policy": "PolicyError",
    "sottovoce.device": "DeviceError",
    "sottovoce.sync": "SyncError",
    "sottovoce.aggregator": "AggregatorError",
    "sottovoce.sim": "SimulationError",
}
# Public modules outside a package's __init__ that define errors, and the package they belong to.
EXTRA_ERRORS = {"sottovoce.sync.transport": "sottovoce.sync"}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_exported_members(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])
    for name in module.__all__:
        assert hasattr(module, name), name
    public = {n for n in vars(module) if not n.startswith("_") and not _is_submodule(module, n)}
    assert public <= set(module.__all__), "public names outside __all__"


def _is_submodule(module: object, name: str) -> bool:
    return type(getattr(module, name)).__name__ == "module"


def test_every_error_has_a_code_and_one_root() -> None:
    from sottovoce import SottovoceError, aggregator, device, policy, sim, sync

    errors = [error for m in (aggregator, device, policy, sim, sync) for error in _errors(m)]
    assert len(errors) >= 20
    for error in errors:
        assert issubclass(error, SottovoceError), error
        assert error.code != "error", error
    for a in errors:
        for b in errors:
            # one code, one meaning: only a class refining another may share its code
            if a is not b and a.code == b.code:
                assert issubclass(a, b) or issubclass(b, a), (a, b)


def test_every_code_a_sync_error_carries_is_a_registry_row() -> None:
    from sottovoce import sync
    from sottovoce.policy import REASONS, reason

    errors = [e for e in _package_errors("sottovoce.sync") if e is not sync.SyncError]
    for error in errors:
        assert reason(error.code).code == error.code, error
    # what the aggregator's open_delta raises is logged as the decision's reason
    opened = [sync.UnsupportedProtocol, sync.WrongRegion, sync.RoundClosed, sync.Undecryptable,
              sync.Malformed, sync.BadSignature, sync.NonFinite, sync.NormExceeded]  # fmt: skip
    assert {e.code for e in opened} <= set(REASONS)
    assert sync.SpecRefused("x", rule="epsilon", code="budget_exhausted").code in REASONS


def test_a_sync_error_cannot_carry_a_code_the_registry_lacks() -> None:
    from sottovoce.sync import SpecRefused, SyncError

    with pytest.raises(KeyError, match="made_up_code"):
        SpecRefused("the round is too costly", rule="epsilon", code="made_up_code")
    with pytest.raises(KeyError, match="another_made_up_code"):

        class _Invented(SyncError):
            code = "another_made_up_code"


def _errors(module: ModuleType) -> list[type[BaseException]]:
    """The exception classes a module exports: its ``__all__``, else the public ones it defines."""
    if hasattr(module, "__all__"):
        values = [getattr(module, n) for n in module.__all__]
    else:
        values = [v for n, v in vars(module).items() if not n.startswith("_")]
        values = [v for v in values if getattr(v, "__module__", None) == module.__name__]
    return [v for v in values if isinstance(v, type) and issubclass(v, BaseException)]


def _package_errors(package: str) -> list[type[BaseException]]:
    modules = [package, *(m for m, owner in EXTRA_ERRORS.items() if owner == package)]
    found = [error for m in modules for error in _errors(importlib.import_module(m))]
    return list(dict.fromkeys(found))


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_each_package_has_one_exception_root(package: str) -> None:
    from sottovoce import SottovoceError

    module = importlib.import_module(package)
    root = getattr(module, ROOTS[package])
    assert root.__bases__ == (SottovoceError,)
    errors = _package_errors(package)
    assert root in errors and len(errors) >= 2
    for error in errors:
        assert issubclass(error, root), f"{error.__name__} is not a {root.__name__}"
    # another package's root is never exported here
    others = {getattr(importlib.import_module(p), r) for p, r in ROOTS.items() if p != package}
    assert not others & set(errors)


def test_every_error_type_is_exported_by_exactly_one_module() -> None:
    import sottovoce
    from sottovoce import SottovoceError

    modules = [*PUBLIC, *EXTRA_ERRORS]
    exported: dict[type[BaseException], list[str]] = {}
    for name in modules:
        for error in _errors(importlib.import_module(name)):
            if error.__module__.startswith("sottovoce"):
                exported.setdefault(error, []).append(name)
    twice = {e.__name__: where for e, where in exported.items() if len(where) > 1}
    assert not twice, f"exported by more than one module: {twice}"

    def below(cls: type[BaseException]) -> set[type[BaseException]]:
        return {s for c in cls.__subclasses__() for s in {c, *below(c)}}

    defined = {
        e for e in below(SottovoceError)
        if e.__module__.startswith("sottovoce.") and not e.__name__.startswith("_")
    }  # fmt: skip
    assert len(defined) >= 40 and sottovoce.ClockError in defined
    unexported = sorted(f"{e.__module__}.{e.__name__}" for e in defined - set(exported))
    assert not unexported, f"public errors no module exports: {unexported}"


_NODE = re.compile(r"^    ((?:[│ ]   )*)(?:[├└]── )?([A-Z]\w*)\b")


def _drawn_tree(doc: str, root: str) -> dict[str, str | None]:
    """The tree drawn below ``root`` in a docstring: each class name and its drawn parent."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^    {root}\b", line))
    parents: dict[str, str | None] = {root: None}
    path = [root]
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        match = _NODE.match(line)
        if match is None or not re.search(r"[├└]── ", line[: match.end(2)]):
            continue  # the rest of the line above
        depth = len(match.group(1)) // 4 + 1
        del path[depth:]
        parents[match.group(2)] = path[-1]
        path.append(match.group(2))
    return parents


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_each_package_docstring_draws_its_error_tree(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__doc__ is not None
    drawn = _drawn_tree(module.__doc__, ROOTS[package])
    errors = {e.__name__: e for e in _package_errors(package)}
    assert set(drawn) == set(errors), "the drawing and the exported errors differ"
    for name, parent in drawn.items():
        if parent is not None:
            assert errors[parent] in errors[name].__bases__, f"{name} is drawn under {parent}"


def test_the_top_docstring_draws_the_roots() -> None:
    import sottovoce

    assert sottovoce.__doc__ is not None
    drawn = _drawn_tree(sottovoce.__doc__, "SottovoceError")
    assert set(drawn) == {"SottovoceError", "ClockError", *ROOTS.values()}
    assert all(parent in (None, "SottovoceError") for parent in drawn.values())


def test_the_tree_parser_sees_nesting_and_skips_continued_lines() -> None:
    doc = """Errors::

    Root          root
    ├── A         a    text
    │   │              more text
    │   └── B     b
    └── C         c    text
                       | c_other
"""
    assert _drawn_tree(doc, "Root") == {"Root": None, "A": "Root", "B": "A", "C": "Root"}
