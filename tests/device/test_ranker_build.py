"""The drift test: rebuilding the ranker with TensorFlow reproduces the committed file.

Needs the ``build`` extra (TensorFlow); skipped without it. ``scripts/build-ranker`` runs it
after every build. It compares what matters to a device: the ops, the signatures, the
parameter count, and the outputs on the manifest's fixed input (within float tolerance);
with the TensorFlow version that made the committed file, the bytes must match too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from sottovoce.device._build_ranker import (  # noqa: E402
    build,
    initial_weights,
    load_manifest,
    probe_input,
)
from sottovoce.device._ranker import (  # noqa: E402
    FEATURES,
    Ranker,
    RankerError,
    check_builtin_only,
    default_model_path,
    model_ops,
)

FLEX_SAMPLE = Path(__file__).with_name("data") / "flex_erf.tflite"
# What a rebuild may change without being a different model.
INCIDENTAL = {"sha256", "bytes", "tensorflow"}


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranker") / "ranker.tflite"
    build(out)
    return out


@pytest.fixture(scope="module")
def committed_manifest() -> dict[str, Any]:
    return load_manifest()


def test_rebuild_uses_the_same_ops(rebuilt: Path) -> None:
    check_builtin_only(rebuilt)
    assert sorted(model_ops(rebuilt)) == sorted(model_ops(default_model_path()))


def test_rebuild_has_the_same_signatures_and_parameter_count(rebuilt: Path) -> None:
    new, old = Ranker.load(rebuilt), Ranker.load()
    assert new.signatures == old.signatures
    assert new.parameter_count == old.parameter_count


def test_rebuild_gives_the_same_outputs_on_the_fixed_input(
    rebuilt: Path, committed_manifest: dict[str, Any]
) -> None:
    new, old = Ranker.load(rebuilt), Ranker.load()
    np.testing.assert_allclose(new.infer(probe_input()), old.infer(probe_input()), atol=1e-5)
    np.testing.assert_allclose(
        new.infer(probe_input()), committed_manifest["probe"]["scores"], rtol=0, atol=1e-5
    )
    np.testing.assert_array_equal(new.get_weights(), initial_weights())


def test_rebuild_trains_like_the_committed_model(rebuilt: Path) -> None:
    new, old = Ranker.load(rebuilt), Ranker.load()
    rng = np.random.default_rng(2)
    for _ in range(5):
        x = rng.standard_normal((32, FEATURES))
        y = (rng.random(32) < 0.5).astype(np.float32)
        assert new.train_step(x, y, lr=0.01) == pytest.approx(old.train_step(x, y, lr=0.01))
    np.testing.assert_allclose(new.get_state(), old.get_state(), rtol=1e-5, atol=1e-6)


def test_rebuilt_manifest_matches_the_committed_one(
    rebuilt: Path, committed_manifest: dict[str, Any]
) -> None:
    new = load_manifest(rebuilt)
    assert {k: v for k, v in new.items() if k not in INCIDENTAL} == {
        k: v for k, v in committed_manifest.items() if k not in INCIDENTAL
    }


def test_with_the_same_tensorflow_the_rebuild_is_byte_identical(
    rebuilt: Path, committed_manifest: dict[str, Any]
) -> None:
    if tf.__version__ != committed_manifest["tensorflow"]:
        pytest.skip(f"committed with TensorFlow {committed_manifest['tensorflow']}")
    assert rebuilt.read_bytes() == default_model_path().read_bytes()


def flex_model() -> bytes:
    """A tiny real model with a Flex op (how ``tests/device/data/flex_erf.tflite`` was made)."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])  # type: ignore[untyped-decorator]
    def erf(x: Any) -> Any:
        return tf.math.erf(x)  # no builtin kernel: the converter falls back to Flex

    converter = tf.lite.TFLiteConverter.from_concrete_functions([erf.get_concrete_function()])
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    content: bytes = converter.convert()
    return content


def test_the_check_catches_a_real_flex_model(tmp_path: Path) -> None:
    path = tmp_path / "flex.tflite"
    path.write_bytes(flex_model())
    assert model_ops(path) == ["FlexErf"] == model_ops(FLEX_SAMPLE)
    with pytest.raises(RankerError, match=r"Flex \(TensorFlow\) ops FlexErf"):
        check_builtin_only(path)
