"""A sealed delta's ciphertext is decoded once, when the message is read, and what is handed
on is always the ciphertext the message holds."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from sottovoce.sync import SealedDelta

ENC = base64.b64encode(bytes(32)).decode()


def sealed(ciphertext: str) -> SealedDelta:
    return SealedDelta.model_validate({
        "region": "eu", "round_id": "eu-r1", "model_version": 0, "pseudonym": "ab" * 32,
        "period": "2026-11-01", "device_key": base64.b64encode(bytes(32)).decode(),
        "idempotency_key": "k" * 32, "enc": ENC, "ciphertext": ciphertext,
    })  # fmt: skip


def test_the_ciphertext_is_decoded_when_read_and_handed_on() -> None:
    text = base64.b64encode(b"\x01\x02\x03sealed").decode()
    delta = sealed(text)
    assert delta.ciphertext_bytes() == b"\x01\x02\x03sealed"
    assert SealedDelta.from_wire(delta.to_wire()).ciphertext_bytes() == b"\x01\x02\x03sealed"


def test_a_copy_with_another_ciphertext_hands_on_its_own() -> None:
    delta = sealed(base64.b64encode(b"first").decode())
    other = delta.model_copy(update={"ciphertext": base64.b64encode(b"second").decode()})
    assert other.ciphertext_bytes() == b"second" and delta.ciphertext_bytes() == b"first"


@pytest.mark.parametrize("bad", ["not base64!", "YQ=", "", "YWJj\n"])
def test_a_ciphertext_that_is_not_standard_base64_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="ciphertext"):
        sealed(bad)
