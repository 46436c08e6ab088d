"""Public API is declared once per package; this pins it (like httpx's test of the same name)."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "sottovoce": ["SottovoceError", "__version__"],
    "sottovoce.policy": [
        "Accountant", "Action", "AgeGate", "AgeRestricted", "Aggregator", "AggregatorKey",
        "BudgetExhausted", "Change", "Checkpoint", "CheckpointError", "CheckpointSigner",
        "ConsentMissing", "ConsentMode", "ConsentState", "ConsistencyProofError", "DataClass",
        "Decision", "DecisionEngine", "DecisionLog", "DeviceCap", "InclusionProof",
        "InclusionProofError",
        "InvalidPolicy", "LogError", "Outcome", "PURPOSE_DATA", "Policy", "PolicyError",
        "PolicyViolation", "PrivacyBudget", "PrivacyMode", "Problem", "ProofError", "Purpose",
        "REASONS", "Region", "ResidencyViolation", "UnknownRegion", "VerifyReport",
        "consent_allows", "consent_refusal", "diff_policies", "example_policy",
        "example_policy_path", "format_diff", "format_duration", "leaf_hash", "load_policy",
        "open_checkpoint", "parse_policy", "parse_verifier_key", "policy_from_data",
        "render_report", "verify_consistency", "verify_inclusion",
    ],
    "sottovoce.device": [
        "AppendResult", "COMPLETION_FRACTION", "CatalogError", "CatalogItem", "Context",
        "DeviceError", "Dislike", "Durability", "EARLY_SKIP_MS", "Eligibility", "Event",
        "EventConflict", "EventStore", "FEATURES", "ITEM_DIM", "InvalidEvent", "InvalidEventBatch",
        "Like", "LocalRound", "ModelWeights", "Navigate", "NotEligible", "PARAMETER_COUNT",
        "Pause", "Personalizer", "PlayEnd", "PlayStart", "PurgeReport", "QUALIFIED_PLAY_MS",
        "RankedItem", "Ranker", "RankerError", "Ranking", "RerankOptions", "Resume",
        "SCHEMA_VERSION", "SESSION_GAP_MS", "Search", "Seek", "Skip", "StoreCorrupt", "StoreError",
        "StoreFull",
        "TASTE_HALF_LIFE_MS", "check_builtin_only", "from_ms", "is_completion", "is_play", "to_ms",
    ],
    "sottovoce.sync": [
        "Acknowledged", "AggregatorUnavailable", "BadSignature", "Charge", "DeltaState", "Drop",
        "EnrollmentRefused", "Malformed", "ModelRelease", "NOISE_SLACK_SIGMAS", "NonFinite",
        "Mechanism", "NormExceeded", "OpenedDelta", "Outbox", "OutboxItem", "Outcome",
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
        "AggregationError", "BudgetExceeded", "LedgerEntry", "PartialSum", "PrivacyLedger",
        "RefusalLimit", "RegionAggregator", "RegionKeys", "RoundInfo", "RoundScheduler",
        "RoundStillOpen",
        "ServiceConfig", "ServiceConfigError", "build_app", "central_release", "create_app",
        "epsilon_of", "generate_keys", "load_keys",
    ],
}  # fmt: skip


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
    from sottovoce import SottovoceError, aggregator, device, policy, sync

    errors = [
        getattr(m, n) for m in (aggregator, device, policy, sync) for n in m.__all__
        if isinstance(getattr(m, n), type) and issubclass(getattr(m, n), Exception)
    ]  # fmt: skip
    assert len(errors) >= 20
    for error in errors:
        assert issubclass(error, SottovoceError), error
        assert error.code != "error", error
    for a in errors:
        for b in errors:
            # one code, one meaning: only a class refining another may share its code
            if a is not b and a.code == b.code:
                assert issubclass(a, b) or issubclass(b, a), (a, b)


def test_every_refusal_sync_raises_is_a_logged_reason() -> None:
    from sottovoce import sync
    from sottovoce.policy import REASONS

    codes = {
        getattr(sync, n).code
        for n in sync.__all__
        if isinstance(getattr(sync, n), type) and issubclass(getattr(sync, n), Exception)
    }
    codes -= {"sync_error", "wrong_model", "aggregator_unavailable"}  # met on the device only
    assert codes <= set(REASONS), codes - set(REASONS)
