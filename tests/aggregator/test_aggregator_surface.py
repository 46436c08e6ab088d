"""The aggregator is a façade: its public surface is pinned, and no public member of it, or of
the signer that holds the region's keys, is or returns a private key or the connection."""

from __future__ import annotations

import inspect
import sqlite3
import typing
from pathlib import Path

import pytest
from aggregator_helpers import Clock, Keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce.aggregator import RegionAggregator
from sottovoce.aggregator._signer import RegionSigner

PUBLIC = {
    "accept", "accept_many", "close", "current_round", "enroll", "enrollable_periods", "erase",
    "latest_release", "latest_version", "ledger", "log", "log_refusal_counts", "open_round",
    "refuse", "refuse_enrollment", "refuse_too_large", "round", "round_mechanism", "sweep",
    "write_many",
}  # fmt: skip
SECRET_TYPES = (Ed25519PrivateKey, X25519PrivateKey, sqlite3.Connection)


@pytest.fixture
def agg(tmp_path: Path) -> typing.Iterator[RegionAggregator]:
    keys = Keys()
    aggregator = keys.aggregator(sqlite3.connect(tmp_path / "a.db"), clock=Clock())
    yield aggregator
    aggregator.close()


def test_the_public_surface_is_pinned(agg: RegionAggregator) -> None:
    assert {n for n in dir(agg) if not n.startswith("_")} == PUBLIC


def test_no_public_member_is_or_returns_a_private_key_or_the_connection(
    agg: RegionAggregator,
) -> None:
    for owner in (agg, RegionSigner):
        for name in (n for n in dir(owner) if not n.startswith("_")):
            member = getattr(owner, name)
            assert not isinstance(member, SECRET_TYPES), name
            if callable(member):
                hints = typing.get_type_hints(member) if inspect.isfunction(
                    getattr(member, "__func__", member)) else {}  # fmt: skip
                returned = str(hints.get("return", ""))
                assert "PrivateKey" not in returned and "Connection" not in returned, name


def test_the_signer_keeps_its_keys_out_of_reach(tmp_path: Path) -> None:
    keys = Keys()
    signer = RegionSigner(keys.policy().region("eu"), signing_key=keys.signing,
                          hpke_key=keys.hpke)  # fmt: skip
    assert not hasattr(signer, "__dict__")  # slots only: nothing can be parked on it
    visible = [getattr(signer, n) for n in dir(signer) if not n.startswith("_")]
    assert not any(isinstance(v, SECRET_TYPES) for v in visible)
    assert repr(signer) == f"RegionSigner(region='eu', kid={signer.kid!r})"
    # It signs with the region's key without handing it out: the release verifies under the
    # public half the policy publishes.
    from sottovoce.sync import verify_release

    release = signer.sign_release(model_id="ab" * 32, version=1, weights=[0.5, 0.25],
                                  created=Clock().now)  # fmt: skip
    assert list(verify_release(release, keys.signing.public_key())) == [0.5, 0.25]
