"""The store's public surface: what it offers, and that nothing on it hands out the device's
secret, a private key or the connection (the keys sign and seal; they are never returned)."""

from __future__ import annotations

import base64
import inspect
import json
import sqlite3
import typing
from pathlib import Path

import numpy as np
from conftest import NOW, round_spec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlite_utils import Database
from store_peek import peek

from sottovoce.device import EventStore
from sottovoce.device._store_keys import DeviceKeys
from sottovoce.policy import CheckpointSigner, Purpose, example_policy
from sottovoce.sync import (
    device_noise_std,
    idempotency_key,
    open_delta,
    period_label,
    pseudonym,
    sample_into_round,
)

SECRET = bytes(range(100, 132))  # the test knows it; the store must never give it back
PUBLIC = {
    "acknowledge", "allows", "append", "append_many", "attempted", "catalog", "charge", "close",
    "consent_state", "contribution", "count", "decisions", "derived_state", "drop", "due",
    "erase_user", "export_user", "facts", "generation", "grant", "in_outbox", "keys",
    "load_model", "now", "one_read", "open", "outbox_states", "path", "personalization", "policy",
    "privacy_history", "purge_expired", "queue_local_round", "ranking_inputs", "rebuild_derived",
    "refusal", "region", "save_model", "set_age", "snapshot", "upsert_catalog", "user_hash",
    "withdraw",
}  # fmt: skip
KEY_METHODS = {"in_round", "public_key", "seal", "upload_key"}
# What no public value or method may be or return: key material, or a way to the file's rows.
SECRET_TYPES = (Ed25519PrivateKey, X25519PrivateKey, CheckpointSigner, sqlite3.Connection,
                Database)  # fmt: skip


def _public(obj: object) -> list[str]:
    return sorted(name for name in dir(obj) if not name.startswith("_"))


def _opened(tmp_path: Path) -> EventStore:
    store = EventStore.open(tmp_path / "d.db", policy=example_policy(), region="us",
                            clock=lambda: NOW, device_secret=SECRET)  # fmt: skip
    store.set_age("ann", 30)
    store.grant("ann", Purpose.FEDERATED_TRAINING)
    return store


def _key_material(store: EventStore) -> list[bytes]:
    """Every secret the file holds, raw and in hex, as read by a connection of one's own."""
    periods = [h for (h,) in peek(store, "SELECT signing_key FROM device_keys")]
    hexes = [h for (h,) in peek(store, "SELECT value FROM meta WHERE key IN "
                                       "('device_secret', 'salt', 'digest_key')")]  # fmt: skip
    hexes += [h for (h,) in peek(store, "SELECT value FROM decision_log_meta "
                                        "WHERE key = 'signing_key'")]  # fmt: skip
    # The device secret, the salt, the digest key, the log's signing key; a key per period.
    assert SECRET.hex() in hexes and len(hexes) == 4 and periods
    hexes += periods
    return [*(bytes.fromhex(h) for h in hexes), *(h.encode() for h in hexes)]


def test_the_public_surface_is_pinned() -> None:
    # Attributes set on opening (keys, path, policy, region) are not on the class.
    assert set(_public(EventStore)) | {"keys", "path", "policy", "region"} == PUBLIC
    assert set(_public(DeviceKeys)) == KEY_METHODS


def test_no_public_member_is_or_returns_a_key_a_secret_or_the_connection(
    tmp_path: Path,
) -> None:
    store = _opened(tmp_path)
    spec = round_spec(store.policy, "us", model_id="ab" * 32)
    period = period_label(spec)
    store.keys.public_key(period)  # makes the period's key, so that there is one to look for
    material = _key_material(store)
    assert set(_public(store)) == PUBLIC
    for owner in (store, store.keys):
        for name in _public(owner):
            value = getattr(owner, name)
            if callable(value) and not isinstance(value, SECRET_TYPES):
                hints = typing.get_type_hints(inspect.unwrap(getattr(type(owner), name)))
                returned = repr(hints.get("return"))
                for kind in (*SECRET_TYPES, bytes):
                    assert kind.__name__ not in returned, f"{name} returns {returned}"
                continue
            assert not isinstance(value, SECRET_TYPES), name
            assert not any(m in repr(value).encode() for m in material), name
    log = store.decisions  # the decision log keeps its checkpoint signer to itself too
    assert not any(isinstance(getattr(log, name), SECRET_TYPES) for name in _public(log))
    # Nothing is kept on the keys object between calls: the keys stay in the file.
    assert not hasattr(store.keys, "__dict__")
    assert all(not isinstance(getattr(store.keys, s, None), (*SECRET_TYPES, bytes))
               for s in type(store.keys).__slots__)  # fmt: skip
    # What the app can export about the user carries none of it either.
    exported = json.dumps(store.export_user("ann")).encode()
    assert not any(m in exported for m in material)
    store.close()


def test_the_keys_sign_and_seal_without_giving_the_keys_out(tmp_path: Path) -> None:
    store = _opened(tmp_path)
    hpke = X25519PrivateKey.generate()
    spec = round_spec(store.policy, "us", model_id="ab" * 32, sampling_rate=1.0)
    period = period_label(spec)
    public = store.keys.public_key(period)
    assert isinstance(public, Ed25519PublicKey)
    assert store.keys.public_key(period) == public  # one key per period, kept
    assert store.keys.public_key("2099-01-01") != public
    ((private_hex,),) = peek(store, "SELECT signing_key FROM device_keys WHERE period = ?",
                             [period])  # fmt: skip
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
    assert private.public_key() == public
    # What the secret keys comes out as the sync functions compute it from the secret itself.
    assert store.keys.in_round(spec) is sample_into_round(spec, SECRET) is True
    key = store.keys.upload_key(spec)
    assert key == idempotency_key(SECRET, spec=spec, period=period)
    delta = np.linspace(-0.01, 0.01, 16, dtype=np.float32)
    sealed = store.keys.seal(delta, spec=spec, aggregator_hpke_key=hpke.public_key(),
                             rng=np.random.default_rng(0))  # fmt: skip
    wire = sealed.to_wire()
    assert not any(m in wire for m in _key_material(store))
    opened = open_delta(sealed, region="us", round_id=spec.round_id,
                        model_version=spec.model_version, hpke_private_key=hpke,
                        clipping_norm=spec.clipping_norm,
                        noise_std=device_noise_std(spec))  # fmt: skip
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert opened.device_key == base64.b64encode(raw).decode()  # signed with the period's key
    assert (opened.pseudonym, opened.idempotency_key) == (pseudonym(SECRET, period), key)
    store.close()
