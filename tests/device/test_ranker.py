"""The committed ranker: builtin ops only, matches its manifest, scores and trains correctly.

Runs on the real TFLite runtime without TensorFlow. The training checks compare the model's
hand-written backward pass and Adam step with an independent float64 numpy implementation.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from sottovoce.device._build_ranker import initial_weights, load_manifest, probe_input
from sottovoce.device._errors import DeviceError
from sottovoce.device._ranker import (
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPSILON,
    FEATURES,
    LAYERS,
    PARAMETER_COUNT,
    SIGNATURES,
    STATE_SIZE,
    Ranker,
    RankerError,
    check_builtin_only,
    default_model_path,
    model_ops,
)
from sottovoce.device._tflite_ops import _FALLBACK_BUILTIN_NAMES

Array = npt.NDArray[np.float64]
P = PARAMETER_COUNT


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return load_manifest()


@pytest.fixture
def ranker() -> Ranker:
    return Ranker.load()


def batch(n: int, seed: int) -> tuple[Array, Array, Array]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES))
    y = (rng.random(n) < 0.5).astype(np.float64)
    w = rng.uniform(0.5, 2.0, n)
    return x, y, w


# --- An independent reference: forward, hand-derived backward and Adam in float64 -------------


def unflatten(theta: Array) -> list[Array]:
    bounds = np.cumsum([0, *(int(np.prod(shape)) for _, shape in LAYERS)])
    return [
        theta[a:b].reshape(shape)
        for (_, shape), a, b in zip(LAYERS, bounds[:-1], bounds[1:], strict=True)
    ]


def np_forward(theta: Array, x: Array) -> tuple[Array, Array, Array]:
    w1, b1, w2, b2, w3, b3 = unflatten(theta)
    h1 = np.maximum(x @ w1 + b1, 0)
    h2 = np.maximum(h1 @ w2 + b2, 0)
    return (h2 @ w3 + b3).reshape(-1), h1, h2


def np_bce(s: Array, y: Array, w: Array) -> float:
    losses = np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))
    return float((w * losses).sum() / w.sum())


def np_loss_and_grad(theta: Array, x: Array, y: Array, w: Array) -> tuple[float, Array]:
    s, h1, h2 = np_forward(theta, x)
    _, _, w2, _, w3, _ = unflatten(theta)
    g3 = (w * (1 / (1 + np.exp(-s)) - y) / w.sum())[:, None]
    g2 = (g3 @ w3.T) * (h2 > 0)
    g1 = (g2 @ w2.T) * (h1 > 0)
    parts = [x.T @ g1, g1.sum(0), h1.T @ g2, g2.sum(0), h2.T @ g3, g3.sum(0)]
    return np_bce(s, y, w), np.concatenate([p.reshape(-1) for p in parts])


def np_adam(state: Array, grad: Array, lr: float) -> Array:
    theta, m, v, step = state[:P], state[P : 2 * P], state[2 * P : 3 * P], state[3 * P] + 1
    m = ADAM_BETA1 * m + (1 - ADAM_BETA1) * grad
    v = ADAM_BETA2 * v + (1 - ADAM_BETA2) * grad**2
    m_hat, v_hat = m / (1 - ADAM_BETA1**step), v / (1 - ADAM_BETA2**step)
    theta = theta - lr * m_hat / (np.sqrt(v_hat) + ADAM_EPSILON)
    return np.concatenate([theta, m, v, [step]])


# --- The file and its manifest -----------------------------------------------------------------


def test_committed_model_uses_builtin_ops_only(manifest: dict[str, Any]) -> None:
    path = default_model_path()
    check_builtin_only(path)
    ops = model_ops(path)
    assert ops == manifest["ops"]
    assert "CUSTOM" not in ops
    assert not [op for op in ops if op.startswith(("Flex", "BUILTIN_"))]


def test_model_id_is_the_sha256_of_the_file(ranker: Ranker, manifest: dict[str, Any]) -> None:
    digest = hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    assert ranker.model_id == digest == manifest["sha256"]
    assert default_model_path().stat().st_size == manifest["bytes"]


def test_signatures_and_shapes_match_the_manifest(ranker: Ranker, manifest: dict[str, Any]) -> None:
    assert ranker.signatures == manifest["signatures"]
    assert list(ranker.signatures) == list(SIGNATURES)
    assert ranker.signatures["infer"]["inputs"]["x"]["shape"] == [-1, FEATURES]
    assert ranker.parameter_count == manifest["parameter_count"] == PARAMETER_COUNT
    assert manifest["features"] == FEATURES
    assert manifest["state_size"] == STATE_SIZE == 3 * P + 1
    assert [(layer["name"], tuple(layer["shape"])) for layer in manifest["layers"]] == list(LAYERS)


def test_infer_on_the_fixed_input_matches_the_manifest(
    ranker: Ranker, manifest: dict[str, Any]
) -> None:
    scores = ranker.infer(probe_input())
    assert scores.dtype == np.float32
    assert scores.shape == (manifest["probe"]["rows"],)
    np.testing.assert_allclose(scores, manifest["probe"]["scores"], rtol=0, atol=1e-5)


def test_a_fresh_model_holds_the_seeded_initial_weights_and_no_optimizer_state(
    ranker: Ranker,
) -> None:
    np.testing.assert_array_equal(ranker.get_weights(), initial_weights())
    state = ranker.get_state()
    np.testing.assert_array_equal(state[:P], initial_weights())
    assert not state[P:].any()


def test_the_packaged_file_is_what_load_finds_by_default() -> None:
    assert default_model_path().name == "ranker.tflite"
    assert default_model_path().with_name("ranker.json").is_file()
    assert Ranker.load().model_id == Ranker.load(default_model_path()).model_id


# --- Scoring ------------------------------------------------------------------------------------


def test_infer_matches_a_numpy_forward_pass_for_any_weights(ranker: Ranker) -> None:
    rng = np.random.default_rng(7)
    theta = rng.normal(0, 0.1, P)
    ranker.set_weights(theta)
    x = rng.standard_normal((500, FEATURES)).astype(np.float32)
    scores = ranker.infer(x)
    assert scores.shape == (500,)
    expected, _, _ = np_forward(theta.astype(np.float32).astype(np.float64), x.astype(np.float64))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_infer_sees_weights_changed_by_training_and_by_set_weights(ranker: Ranker) -> None:
    # The runtime must not keep a copy of the weights from an earlier call.
    x, y, w = batch(64, seed=3)
    before = ranker.infer(x)
    ranker.train_step(x, y, w, lr=0.05)
    after = ranker.infer(x)
    assert not np.allclose(before, after)
    trained = ranker.get_weights().astype(np.float64)
    np.testing.assert_allclose(after, np_forward(trained, x)[0], rtol=1e-4, atol=1e-5)
    ranker.set_weights(initial_weights())
    np.testing.assert_allclose(ranker.infer(x), before, rtol=0, atol=1e-6)


def test_infer_takes_any_batch_size_and_lists(ranker: Ranker) -> None:
    x = probe_input()
    full = ranker.infer(x)
    for n in (1, 2, 3):
        np.testing.assert_allclose(ranker.infer(x[:n]), full[:n], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ranker.infer(x.tolist()), full, rtol=0, atol=1e-6)
    assert ranker.infer(np.zeros((0, FEATURES))).shape == (0,)
    # Results are the caller's own arrays, not views of the runtime's buffers.
    first, kept = ranker.infer(x), full.copy()
    ranker.infer(-x)
    np.testing.assert_array_equal(first, kept)


def test_rankers_are_independent(ranker: Ranker) -> None:
    other = Ranker.load()
    ranker.set_weights(np.zeros(P, dtype=np.float32))
    assert other.get_weights().any()
    assert other.model_id == ranker.model_id


# --- Weights and state --------------------------------------------------------------------------


def test_weights_round_trip(ranker: Ranker) -> None:
    weights = np.random.default_rng(1).normal(0, 1, P).astype(np.float32)
    ranker.set_weights(weights)
    got = ranker.get_weights()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, weights)


def test_state_round_trip_carries_everything_training_needs(ranker: Ranker) -> None:
    x, y, w = batch(32, seed=5)
    for _ in range(3):
        ranker.train_step(x, y, w, lr=0.01)
    state = ranker.get_state()
    assert state.shape == (STATE_SIZE,)
    assert state[-1] == 3
    other = Ranker.load()
    other.set_state(state)
    np.testing.assert_array_equal(other.get_state(), state)
    np.testing.assert_array_equal(other.get_weights(), state[:P])
    # Same state, same batch: the same next step.
    assert other.train_step(x, y, w, lr=0.01) == ranker.train_step(x, y, w, lr=0.01)
    np.testing.assert_array_equal(other.get_state(), ranker.get_state())


def test_set_weights_keeps_the_optimizer_state_and_reset_forgets_it(ranker: Ranker) -> None:
    x, y, w = batch(32, seed=6)
    ranker.train_step(x, y, w)
    moments = ranker.get_state()[P:]
    ranker.set_weights(initial_weights())
    np.testing.assert_array_equal(ranker.get_state()[P:], moments)
    ranker.reset_optimizer()
    state = ranker.get_state()
    np.testing.assert_array_equal(state[:P], initial_weights())
    assert not state[P:].any()


# --- Training -----------------------------------------------------------------------------------


def test_first_adam_step_matches_numpy(ranker: Ranker) -> None:
    x, y, w = batch(32, seed=11)
    lr = 1e-3
    theta = ranker.get_weights().astype(np.float64)
    loss, grad = np_loss_and_grad(theta, x, y, w)
    expected = np_adam(np.concatenate([theta, np.zeros(2 * P + 1)]), grad, lr)

    got_loss = ranker.train_step(x, y, w, lr=lr)
    state = ranker.get_state().astype(np.float64)

    assert got_loss == pytest.approx(loss, rel=1e-5)
    # The first moment is (1 - beta1) * gradient: the hand-written backward pass, exposed.
    np.testing.assert_allclose(state[P : 2 * P] / (1 - ADAM_BETA1), grad, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(state[2 * P : 3 * P], expected[2 * P : 3 * P], rtol=1e-3, atol=1e-12)
    np.testing.assert_allclose(state[:P] - theta, expected[:P] - theta, rtol=0, atol=1e-4)
    assert state[-1] == 1


def test_second_adam_step_matches_numpy(ranker: Ranker) -> None:
    (x1, y1, w1), (x2, y2, w2) = batch(32, seed=12), batch(16, seed=13)
    lr = 1e-3
    ranker.train_step(x1, y1, w1, lr=lr)
    state = ranker.get_state().astype(np.float64)
    loss, grad = np_loss_and_grad(state[:P], x2, y2, w2)
    expected = np_adam(state, grad, lr)

    assert ranker.train_step(x2, y2, w2, lr=lr) == pytest.approx(loss, rel=1e-5)
    after = ranker.get_state().astype(np.float64)
    np.testing.assert_allclose(after[:P] - state[:P], expected[:P] - state[:P], rtol=0, atol=1e-4)
    np.testing.assert_allclose(after[P : 2 * P], expected[P : 2 * P], rtol=1e-3, atol=1e-8)
    assert after[-1] == 2


def test_row_weights_weight_the_loss(ranker: Ranker) -> None:
    x, y, _ = batch(8, seed=14)
    w = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=np.float64)
    s = ranker.infer(x).astype(np.float64)
    assert ranker.train_step(x, y, w, lr=1e-6) == pytest.approx(np_bce(s[:4], y[:4], w[:4]))


def test_training_learns_a_learnable_problem(ranker: Ranker) -> None:
    rng = np.random.default_rng(21)
    x = rng.standard_normal((256, FEATURES)).astype(np.float32)
    rule = rng.standard_normal(FEATURES)
    y = (x @ rule > 0).astype(np.float64)
    ones = np.ones(256)
    initial = np_bce(ranker.infer(x).astype(np.float64), y, ones)
    losses = [ranker.train_step(x, y, lr=0.01) for _ in range(200)]
    final = np_bce(ranker.infer(x).astype(np.float64), y, ones)
    assert losses[0] == pytest.approx(initial, rel=1e-4)
    assert final < 0.5 * initial
    assert np.isfinite(ranker.get_state()).all()


# --- Refusals -----------------------------------------------------------------------------------

GOOD_X = np.zeros((4, FEATURES), dtype=np.float32)
GOOD_Y = np.array([0, 1, 0, 1], dtype=np.float32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.infer(np.zeros((4, FEATURES - 1))), "shape"),
        (lambda r: r.infer(np.zeros(FEATURES)), "shape"),
        (lambda r: r.infer("rows"), "x"),
        (lambda r: r.train_step(np.zeros((4, 95)), GOOD_Y), "x"),
        (lambda r: r.train_step(GOOD_X[:0], GOOD_Y[:0]), "at least one row"),
        (lambda r: r.train_step(np.full((4, FEATURES), np.nan), GOOD_Y), "finite"),
        (lambda r: r.train_step(GOOD_X, GOOD_Y[:3]), "y"),
        (lambda r: r.train_step(GOOD_X, GOOD_Y + 1), "[0, 1]"),
        (lambda r: r.train_step(GOOD_X, [0, 1, np.nan, 0]), "y"),
        (lambda r: r.train_step(GOOD_X, GOOD_Y, w=np.zeros(4)), "w"),
        (lambda r: r.train_step(GOOD_X, GOOD_Y, w=-np.ones(4)), "w"),
        (lambda r: r.train_step(GOOD_X, GOOD_Y, lr=0.0), "lr"),
        (lambda r: r.train_step(GOOD_X, GOOD_Y, lr=float("nan")), "lr"),
        (lambda r: r.set_weights(np.zeros(P - 1)), "expected 20737"),
        (lambda r: r.set_weights(np.zeros((P, 1))), "weights"),
        (lambda r: r.set_weights(np.full(P, np.nan)), "finite"),
        (lambda r: r.set_weights(np.r_[np.zeros(P - 1), np.inf]), "element 20736"),
        (lambda r: r.set_weights(["a"] * P), "weights"),
        (lambda r: r.set_state(np.zeros(STATE_SIZE - 1)), "state"),
        (lambda r: r.set_state(np.r_[np.zeros(STATE_SIZE - 1), np.nan]), "finite"),
        (lambda r: r.set_state(np.r_[np.zeros(STATE_SIZE - 1), 1.5]), "step"),
        (lambda r: r.set_state(np.r_[np.zeros(STATE_SIZE - 1), -1]), "step"),
        (lambda r: r.set_state(np.r_[np.zeros(2 * P), -np.ones(P), 1]), "second moments"),
        (lambda r: r.set_state(np.r_[np.zeros(P), np.ones(2 * P), 0]), "step count is 0"),
    ],
)
def test_bad_inputs_raise_ranker_error_and_change_nothing(
    ranker: Ranker, call: Any, message: str
) -> None:
    before = ranker.get_state()
    with pytest.raises(RankerError) as caught:
        call(ranker)
    assert message in str(caught.value)
    assert caught.value.code == "ranker_error"
    assert isinstance(caught.value, DeviceError)
    np.testing.assert_array_equal(ranker.get_state(), before)


def test_files_that_are_not_rankers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RankerError, match="cannot read"):
        Ranker.load(tmp_path / "missing.tflite")
    with pytest.raises(RankerError, match="cannot read"):
        check_builtin_only(tmp_path / "missing.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"not a model at all")
    with pytest.raises(RankerError, match="not a TFLite flatbuffer"):
        Ranker.load(tmp_path / "junk.tflite")
    (tmp_path / "other.tflite").write_bytes(crafted_model(["ADD"]))
    with pytest.raises(RankerError):
        Ranker.load(tmp_path / "other.tflite")


# --- The op check on crafted flatbuffers --------------------------------------------------------


def crafted_model(ops: list[str]) -> bytes:
    """A model whose operator_codes are ``ops``: builtin names, or custom codes."""
    flatbuffers = pytest.importorskip("flatbuffers")
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    codes = []
    for op in ops:
        code = schema.OperatorCodeT()
        builtin = getattr(schema.BuiltinOperator, op, None)
        if builtin is None:
            builtin, code.customCode = schema.BuiltinOperator.CUSTOM, op
        # As the converter writes them: the old int8 field saturates at 127.
        code.builtinCode, code.deprecatedBuiltinCode = builtin, min(builtin, 127)
        codes.append(code)
    model = schema.ModelT()
    model.version = 3
    model.operatorCodes = codes
    model.subgraphs = [schema.SubGraphT()]
    model.buffers = [schema.BufferT()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_model_ops_reads_builtin_and_custom_codes(tmp_path: Path) -> None:
    ops = ["ADD", "FULLY_CONNECTED", "CALL_ONCE", "ASSIGN_VARIABLE", "FlexAddV2", "MyCustomOp"]
    path = tmp_path / "crafted.tflite"
    path.write_bytes(crafted_model(ops))
    assert model_ops(path) == ops


def test_check_builtin_only_names_every_flex_and_custom_op(tmp_path: Path) -> None:
    path = tmp_path / "flex.tflite"
    path.write_bytes(crafted_model(["ADD", "FlexRestoreV2", "FlexAddV2", "Mystery"]))
    with pytest.raises(RankerError) as caught:
        check_builtin_only(path)
    text = str(caught.value)
    assert "Flex (TensorFlow) ops FlexRestoreV2, FlexAddV2" in text
    assert "custom ops Mystery" in text
    assert "ADD" not in text.replace("FlexAddV2", "")
    with pytest.raises(RankerError, match="FlexRestoreV2"):
        Ranker.load(path)


def test_check_builtin_only_passes_builtin_only_models(tmp_path: Path) -> None:
    path = tmp_path / "builtin.tflite"
    path.write_bytes(crafted_model(["ADD", "VAR_HANDLE", "READ_VARIABLE"]))
    check_builtin_only(path)


def test_a_custom_op_without_a_custom_code_is_still_custom(tmp_path: Path) -> None:
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    flatbuffers = pytest.importorskip("flatbuffers")
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    model = schema.ModelT()
    model.operatorCodes = [code]
    builder = flatbuffers.Builder(64)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path = tmp_path / "custom.tflite"
    path.write_bytes(bytes(builder.Output()))
    assert model_ops(path) == ["CUSTOM"]
    with pytest.raises(RankerError, match="custom ops CUSTOM"):
        check_builtin_only(path)


def test_corrupt_files_raise_ranker_error_only(tmp_path: Path) -> None:
    good = crafted_model(["ADD", "FlexAddV2", "CALL_ONCE"])
    rng = np.random.default_rng(0)
    path = tmp_path / "corrupt.tflite"
    variants = [good[:n] for n in range(len(good))]
    for _ in range(300):
        flipped = bytearray(good)
        for i in rng.integers(8, len(flipped), 3):
            flipped[i] = int(rng.integers(0, 256))
        variants.append(bytes(flipped))
    for data in variants:
        path.write_bytes(data)
        with contextlib.suppress(RankerError):
            model_ops(path)


def test_fallback_op_names_agree_with_the_runtime_schema() -> None:
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    for code, name in _FALLBACK_BUILTIN_NAMES.items():
        assert getattr(schema.BuiltinOperator, name) == code
    for op in load_manifest()["ops"]:
        assert op in _FALLBACK_BUILTIN_NAMES.values(), op


def test_check_builtin_only_refuses_a_real_flex_model() -> None:
    # Made by TensorFlow's converter with Select TF ops (see test_ranker_build.flex_model).
    sample = Path(__file__).with_name("data") / "flex_erf.tflite"
    assert model_ops(sample) == ["FlexErf"]
    with pytest.raises(RankerError, match="Flex \\(TensorFlow\\) ops FlexErf"):
        check_builtin_only(sample)
    with pytest.raises(RankerError, match="FlexErf"):
        Ranker.load(sample)
