from __future__ import annotations

from typing import Any

import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from sottovoce.policy._canonical import canonical_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=500)
@given(json_values)
def test_equals_the_reference_encoder(value: Any) -> None:
    try:
        expected = bytes(rfc8785.dumps(value))
    except rfc8785.CanonicalizationError:
        return  # values JCS cannot encode (e.g. integers beyond 2**53): same in both paths
    assert canonical_json(value) == expected


def test_known_encodings() -> None:
    assert (
        canonical_json({"b": 1, "a": [True, None, "é\n"]})
        == '{"a":[true,null,"é\\n"],"b":1}'.encode()
    )
    assert canonical_json({"x": 1e-05, "y": 2.0}) == b'{"x":0.00001,"y":2}'
