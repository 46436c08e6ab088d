"""The committed ranker infers and trains alike on both pip TFLite runtimes.

The project runs on ``ai-edge-litert``; ``tflite-runtime`` 2.14 is the accepted fallback, and it
needs numpy < 2, so it cannot share the project's environment. This test builds (once, cached
by requirement under ``~/.cache/sottovoce/venvs``) a small venv with only that runtime and
numpy, runs the same signatures there as :class:`~sottovoce.device.Ranker` does here, and
compares: inference on fixed inputs, a few Adam steps from fixed weights (loss per step,
weights, optimizer state), and inference after training.

It needs the package registry the first time; it is skipped only when the registry cannot be
reached (the reason says so), and fails on any other install error.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sottovoce._venvs import VenvBuildFailed, cached_venv
from sottovoce.device._ranker import FEATURES, PARAMETER_COUNT, STATE_SIZE, Ranker

REQUIREMENTS = ("tflite-runtime==2.14.0", "numpy<2")
TOLERANCE = 1e-5
STEPS = 5
LR = 3e-3  # what local training uses

# Runs in the tflite-runtime venv: no sottovoce, only the interpreter and the signatures the
# project's Ranker calls (set_weights, set_state, infer, train, get_weights, get_state).
SCRIPT = """
import sys
import numpy as np
import tflite_runtime
from tflite_runtime.interpreter import Interpreter

inputs = np.load(sys.argv[2])
interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
run = {name: interpreter.get_signature_runner(name) for name in interpreter.get_signature_list()}
f32 = np.float32
run["set_weights"](weights=inputs["weights"])
# Ranker.reset_optimizer: the weights, zero moments and a zero step count.
moments = np.zeros(inputs["state_size"] - inputs["weights"].size, f32)
run["set_state"](state=np.concatenate([inputs["weights"], moments]))
before = run["infer"](x=inputs["probe"])["scores"]
losses = []
for x, y, w in zip(inputs["x"], inputs["y"], inputs["w"]):
    out = run["train"](x=x, y=y, w=w, lr=f32(inputs["lr"]))
    losses.append(float(out["loss"]))
np.savez(
    sys.argv[3],
    before=before,
    losses=np.array(losses, np.float64),
    weights=run["get_weights"]()["weights"],
    state=run["get_state"]()["state"],
    after=run["infer"](x=inputs["probe"])["scores"],
    version=np.array(tflite_runtime.__version__),
)
"""


def _index_reachable() -> tuple[bool, str]:
    """Whether pip's package index answers (``PIP_INDEX_URL`` or pip's default)."""
    from pip._internal.models.index import PyPI  # pip's own default, not a host named here

    url = os.environ.get("PIP_INDEX_URL") or PyPI.simple_url
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/tflite-runtime/", timeout=15):
            return True, url
    except (urllib.error.URLError, OSError) as error:
        return False, f"{url}: {error}"


def runtime_venv(requirements: tuple[str, ...] = REQUIREMENTS) -> Path:
    """The python of a venv holding exactly ``requirements`` (built once, then cached)."""
    try:
        return cached_venv("tflite-runtime", requirements, timeout=600)
    except VenvBuildFailed as failed:
        reachable, where = _index_reachable()
        if not reachable:
            pytest.skip(f"the package index is unreachable ({where}); cannot install "
                        f"{' '.join(requirements)} to compare the runtimes")  # fmt: skip
        pytest.fail(str(failed))


def test_ranker_infers_and_trains_alike_on_tflite_runtime_2_14(tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    ranker = Ranker.load()
    # Fixed, non-trivial weights: the packaged initial ones, moved off their seeded values.
    weights = (ranker.get_weights() + rng.normal(0, 0.02, PARAMETER_COUNT)).astype(np.float32)
    probe = rng.standard_normal((200, FEATURES)).astype(np.float32)
    x = rng.standard_normal((STEPS, 32, FEATURES)).astype(np.float32)
    y = (rng.random((STEPS, 32)) < 0.3).astype(np.float32)
    w = rng.uniform(0.5, 2.0, (STEPS, 32)).astype(np.float32)
    inputs, outputs, script = tmp_path / "in.npz", tmp_path / "out.npz", tmp_path / "run.py"
    np.savez(inputs, weights=weights, probe=probe, x=x, y=y, w=w, lr=np.float32(LR),
             state_size=np.int64(STATE_SIZE))  # fmt: skip
    script.write_text(SCRIPT)

    python = runtime_venv()
    done = subprocess.run([str(python), str(script), ranker.source, str(inputs), str(outputs)],
                          check=False, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    theirs = dict(np.load(outputs))
    assert str(theirs["version"]) == "2.14.0"

    ranker.set_weights(weights)
    ranker.reset_optimizer()
    ours = {"before": ranker.infer(probe)}
    ours["losses"] = np.array([ranker.train_step(x[i], y[i], w[i], lr=LR) for i in range(STEPS)])
    ours |= {"weights": ranker.get_weights(), "state": ranker.get_state(),
             "after": ranker.infer(probe)}  # fmt: skip

    differences = {
        name: float(np.max(np.abs(ours[name].astype(np.float64) - theirs[name])))
        for name in ("before", "losses", "weights", "state", "after")
    }
    print(f"max |ai-edge-litert - tflite-runtime 2.14.0|: {differences}")
    assert ours["state"][-1] == STEPS == theirs["state"][-1]  # both took every step
    assert not np.array_equal(ours["weights"], weights)  # training moved the weights
    assert max(differences.values()) <= TOLERANCE, differences
