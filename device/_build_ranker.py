"""Build the committed ranker model, ``device/ranker.tflite``, and its manifest ``ranker.json``.

Run in a build environment with TensorFlow (the ``build`` extra; ``scripts/build-ranker`` does
it all)::

    python -m sottovoce.device._build_ranker [--out device/ranker.tflite]

The model is a ``FEATURES`` -> 128 -> 64 -> 1 ReLU MLP whose weights, Adam moments and step
counter live in TFLite resource variables. Training runs inside the model with builtin ops only:
the backward pass of the weighted binary cross-entropy is written out by hand, because
autodiff would bring in Flex ops that no pip runtime runs. Initial weights come from a seeded
numpy generator, so a rebuild starts from the same weights with any TensorFlow version.

The manifest records what the drift test compares a rebuild with (ops, signatures, parameter
count, outputs on :func:`probe_input`) and the file's sha256. Importing this module does not
import TensorFlow: tests without it use :func:`initial_weights` and :func:`probe_input`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sottovoce.device._ranker import (
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPSILON,
    FEATURES,
    HIDDEN,
    LAYERS,
    MANIFEST_FILE,
    MODEL_FILE,
    PARAMETER_COUNT,
    SIGNATURES,
    STATE_SIZE,
    FloatArray,
    Ranker,
    check_builtin_only_bytes,
    default_model_path,
    model_ops,
)

INIT_SEED = 20261121
PROBE_SEED = 0
PROBE_ROWS = 4
MANIFEST_FORMAT = 1


def initial_weights(seed: int = INIT_SEED) -> FloatArray:
    """Glorot-uniform matrices and zero biases, flat in ``LAYERS`` order."""
    rng = np.random.default_rng(seed)
    parts = []
    for _, shape in LAYERS:
        if len(shape) == 2:
            limit = math.sqrt(6.0 / (shape[0] + shape[1]))
            parts.append(rng.uniform(-limit, limit, size=shape).reshape(-1))
        else:
            parts.append(np.zeros(shape))
    return np.concatenate(parts).astype(np.float32)


def probe_input() -> FloatArray:
    """The fixed rows whose ``infer`` output the manifest records."""
    rng = np.random.default_rng(PROBE_SEED)
    return rng.standard_normal((PROBE_ROWS, FEATURES)).astype(np.float32)


def source_model_path() -> Path:
    """``device/ranker.tflite`` in the source tree (this module may run from a link tree)."""
    return Path(__file__).resolve().with_name(MODEL_FILE)


def manifest_path(model: Path) -> Path:
    return model.with_name(MANIFEST_FILE) if model.suffix == ".tflite" else Path(f"{model}.json")


def load_manifest(model: Path | None = None) -> dict[str, Any]:
    model = default_model_path() if model is None else model
    manifest: dict[str, Any] = json.loads(manifest_path(model).read_text())
    return manifest


def _ranker_module(tf: Any) -> Any:
    """The TensorFlow module whose signatures become the TFLite model's."""
    f32 = tf.float32
    p = PARAMETER_COUNT
    bounds = np.cumsum([0, *(math.prod(shape) for _, shape in LAYERS)]).tolist()
    batch = tf.TensorSpec([None, FEATURES], f32, name="x")

    def unflatten(theta: Any) -> list[Any]:
        return [
            tf.reshape(theta[start:end], shape)
            for (_, shape), start, end in zip(LAYERS, bounds[:-1], bounds[1:], strict=True)
        ]

    def flatten(tensors: list[Any]) -> Any:
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def forward(theta: Any, x: Any) -> tuple[Any, ...]:
        w1, b1, w2, b2, w3, b3 = unflatten(theta)
        h1 = tf.nn.relu(tf.matmul(x, w1) + b1)
        h2 = tf.nn.relu(tf.matmul(h1, w2) + b2)
        scores = tf.reshape(tf.matmul(h2, w3) + b3, [-1])
        return scores, h1, h2, w2, w3

    class RankerModule(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name="ranker")
            # One flat vector per quantity keeps every signature a handful of ops. Adam's moments
            # are zero until the first step; rather than store [P] zeros in the file (83 KB;
            # the converter has no splat constant, and shapeless variables are unsafe under
            # the XNNPACK delegate) they start as the same constant as the weights, which the
            # converter stores once, and read as zero while the step counter is 0.
            theta0 = initial_weights()
            self.theta = tf.Variable(theta0, name="theta")
            self.m = tf.Variable(theta0, name="adam_m")
            self.v = tf.Variable(theta0, name="adam_v")
            self.step = tf.Variable(0.0, name="step")

        def moments(self) -> tuple[Any, Any]:
            started = tf.cast(self.step > 0.0, f32)
            return started * self.m, started * self.v

        @tf.function(input_signature=[batch])  # type: ignore[untyped-decorator]
        def infer(self, x: Any) -> dict[str, Any]:
            return {"scores": forward(self.theta, x)[0]}

        @tf.function(  # type: ignore[untyped-decorator]
            input_signature=[
                batch,
                tf.TensorSpec([None], f32, name="y"),
                tf.TensorSpec([None], f32, name="w"),
                tf.TensorSpec([], f32, name="lr"),
            ]
        )
        def train(self, x: Any, y: Any, w: Any, lr: Any) -> dict[str, Any]:
            theta = tf.convert_to_tensor(self.theta)
            s, h1, h2, w2, w3 = forward(theta, x)
            total = tf.maximum(tf.reduce_sum(w), 1e-12)
            # Stable BCE with logits: max(s, 0) - s*y + log1p(exp(-|s|)).
            losses = tf.maximum(s, 0.0) - s * y + tf.math.log1p(tf.exp(-tf.abs(s)))
            loss = tf.reduce_sum(w * losses) / total
            # The backward pass by hand: d loss / d s_i = w_i (sigmoid(s_i) - y_i) / sum(w).
            g3 = tf.reshape(w * (tf.sigmoid(s) - y) / total, [-1, 1])
            g2 = tf.matmul(g3, w3, transpose_b=True) * tf.cast(h2 > 0.0, f32)
            g1 = tf.matmul(g2, w2, transpose_b=True) * tf.cast(h1 > 0.0, f32)
            grad = flatten(
                [
                    tf.matmul(x, g1, transpose_a=True),
                    tf.reduce_sum(g1, axis=0),
                    tf.matmul(h1, g2, transpose_a=True),
                    tf.reduce_sum(g2, axis=0),
                    tf.matmul(h2, g3, transpose_a=True),
                    tf.reduce_sum(g3, axis=0),
                ]
            )
            # Adam with bias correction.
            m_prev, v_prev = self.moments()
            step = self.step.assign_add(1.0)
            m = self.m.assign(ADAM_BETA1 * m_prev + (1.0 - ADAM_BETA1) * grad)
            v = self.v.assign(ADAM_BETA2 * v_prev + (1.0 - ADAM_BETA2) * tf.square(grad))
            m_hat = m / (1.0 - tf.pow(ADAM_BETA1, step))
            v_hat = v / (1.0 - tf.pow(ADAM_BETA2, step))
            self.theta.assign(theta - lr * m_hat / (tf.sqrt(v_hat) + ADAM_EPSILON))
            return {"loss": loss}

        @tf.function(input_signature=[])  # type: ignore[untyped-decorator]
        def get_weights(self) -> dict[str, Any]:
            return {"weights": tf.convert_to_tensor(self.theta)}

        @tf.function(  # type: ignore[untyped-decorator]
            input_signature=[tf.TensorSpec([p], f32, name="weights")]
        )
        def set_weights(self, weights: Any) -> dict[str, Any]:
            self.theta.assign(weights)
            return {"size": tf.size(weights)}

        @tf.function(input_signature=[])  # type: ignore[untyped-decorator]
        def get_state(self) -> dict[str, Any]:
            return {"state": flatten([self.theta, *self.moments(), self.step])}

        @tf.function(  # type: ignore[untyped-decorator]
            input_signature=[tf.TensorSpec([STATE_SIZE], f32, name="state")]
        )
        def set_state(self, state: Any) -> dict[str, Any]:
            self.theta.assign(state[:p])
            self.m.assign(state[p : 2 * p])
            self.v.assign(state[2 * p : 3 * p])
            self.step.assign(state[3 * p])
            return {"size": tf.size(state)}

    return RankerModule()


def convert(tf: Any) -> tuple[bytes, Any]:
    """Trace the module and convert its signatures to a builtin-only TFLite model.

    Returns the model and the TensorFlow module it came from (in its initial state).
    """
    module = _ranker_module(tf)
    with tempfile.TemporaryDirectory() as saved:
        signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
        tf.saved_model.save(module, saved, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        content: bytes = converter.convert()
    return content, module


def verify(content: bytes, module: Any) -> None:
    """Check the converted model against TensorFlow: scores, a train step, and the state."""
    check_builtin_only_bytes(content, what="converted model")
    ranker = Ranker(content, source="converted model")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, FEATURES)).astype(np.float32)
    y = (rng.random(32) < 0.5).astype(np.float32)
    w = rng.uniform(0.5, 2.0, 32).astype(np.float32)
    checks: dict[str, tuple[Any, Any]] = {
        "infer": (ranker.infer(probe_input()), module.infer(probe_input())["scores"].numpy()),
        "loss": (ranker.train_step(x, y, w, lr=0.01), module.train(x, y, w, 0.01)["loss"].numpy()),
        "state": (ranker.get_state(), module.get_state()["state"].numpy()),
    }
    for name, (tflite, tensorflow) in checks.items():
        if not np.allclose(tflite, tensorflow, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"the converted model's {name} differs from TensorFlow's")


def manifest(path: Path, *, tensorflow_version: str) -> dict[str, Any]:
    """Describe a built model file: what a rebuild must reproduce."""
    ranker = Ranker.load(path)
    scores = ranker.infer(probe_input())
    return {
        "format": MANIFEST_FORMAT,
        "model": path.name,
        "sha256": ranker.model_id,
        "bytes": path.stat().st_size,
        "features": FEATURES,
        "hidden": list(HIDDEN),
        "layers": [{"name": name, "shape": list(shape)} for name, shape in LAYERS],
        "parameter_count": ranker.parameter_count,
        "state_size": STATE_SIZE,
        "init": {"kind": "glorot_uniform", "seed": INIT_SEED, "biases": 0.0},
        "optimizer": {
            "kind": "adam",
            "beta1": ADAM_BETA1,
            "beta2": ADAM_BETA2,
            "epsilon": ADAM_EPSILON,
        },
        "loss": "weighted mean binary cross-entropy with logits",
        "ops": model_ops(path),
        "signatures": ranker.signatures,
        "probe": {
            "generator": "numpy default_rng",
            "seed": PROBE_SEED,
            "rows": PROBE_ROWS,
            "distribution": "standard_normal",
            "scores": [round(float(s), 6) for s in scores],
        },
        "tensorflow": tensorflow_version,
    }


def build(out: Path) -> dict[str, Any]:
    """Write the model to ``out`` and its manifest beside it; return the manifest."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    tf = importlib.import_module("tensorflow")
    content, module = convert(tf)
    verify(content, module)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(content)
    described = manifest(out, tensorflow_version=tf.__version__)
    manifest_path(out).write_text(json.dumps(described, indent=2) + "\n")
    return described


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the ranker .tflite and its manifest.")
    parser.add_argument("--out", type=Path, default=source_model_path(), help="model file")
    args = parser.parse_args(argv)
    described = build(args.out)
    print(
        f"wrote {args.out} ({described['bytes']} bytes, {described['parameter_count']} "
        f"parameters, sha256 {described['sha256'][:16]}…) and {manifest_path(args.out).name}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
