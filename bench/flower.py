"""Flower comparison: a DP federated round of the ranker in Flower's simulation and in ours.

Prints one JSON object (progress goes to stderr): per-round seconds and per-trained-device
milliseconds of each side, and their ratios (ours / Flower).

The setup, both sides: 200 clients (``--clients``), each round samples half of them
(``--fraction``), 5 rounds, 50 local Adam steps of batch 32 on 500 examples per client, the
project's 20,737-parameter ranker, two worker processes on this machine's two cores.

Flower (``flwr[simulation]``, its Ray backend, two actors of one CPU each): a ``NumPyClient``
whose ``fit`` loads the global weights into the project's ``ranker.tflite`` and runs the same
``train`` signature 50 times through ``ai-edge-litert`` (the model file and runtime the device
uses; the project's ``Ranker`` class is not installed there, so the client calls the model's
signatures directly: ``set_state`` with zero Adam moments, ``train``, ``get_weights``). Its
examples are 500 seeded random rows per client, kept in memory per actor, as a Flower client
keeps its partition. DP is Flower's central DP with client-side clipping
(``fixedclipping_mod`` + ``DifferentialPrivacyClientSideFixedClipping`` around ``FedAvg``).
A round is the span from the strategy's ``configure_fit`` to the end of its ``aggregate_fit``.

Ours: ``sottovoce.sim.simulate`` with users=200, sampling_rate=0.5, rounds=5, local_steps=50,
examples=500, two worker processes and the coordinator. A round of the reranker's central-DP
pipeline opens a signed round on each region's real aggregator (the FastAPI service in process
through its ASGI app, SQLite in WAL mode with a durable commit per accepted delta); every
sampled device (the real device code in a worker process, on its own SQLite store) installs the
last signed release after checking its signature, checks the spec against its own policy and
its own privacy ledger (dp-accounting), is charged, flips the spec's coin, logs its consent
decision, builds its 500 examples by replaying its own history, trains, clips, seals (Ed25519
signature, HPKE to the region's key, a pseudonym per period) and queues the delta in its
outbox; the coordinator enrolls the device's key for the period (its first round in a period)
and runs its uploader over HTTP as each device finishes, while later devices train; the
aggregator verifies, decrypts, checks the policy, adds the delta to a stored partial sum and
logs its decision in its Merkle log; at the deadline the round is charged to the ledger
(opacus), noised on the fixed-point grid and published as a signed release. A round is one
``run_rounds`` call (both regions at once; timed by wrapping it); ``simulate_per_round_s`` is
the run's ``reranker_federated_dp`` phase over the rounds (with the per-round evaluation and
audits), as an outside reader of ``results["timings_s"]`` would compute it.

What only one side does. Ours, not Flower: the sealing, signing, enrollment and decryption, a
store per device opened and closed every round, examples derived from each device's history
(Flower's are random rows kept in memory), consent and policy checks and a decision log on
both ends, two privacy ledgers, durable sums and noise calibrated to a budget (Flower adds
Gaussian noise of 1.0 x clip / sampled clients and keeps no account). Flower, not us: Ray's
object store and scheduling, and starting its actors inside its first round (our workers start
before the rounds: they create the devices, and load the device library when they start).

Flower runs in its own virtual environment (it needs packages the project does not), built once
and cached under ``~/.cache/sottovoce/venvs`` keyed by its requirements: the same file runs
there as the module ``flower`` (:func:`flower_main`) and imports nothing of sottovoce. Flower's
telemetry and Ray's usage statistics are off, and Ray's local cluster binds to 127.0.0.1.

Usage: ``python bench/flower.py`` (``--skip-ours`` or ``--skip-flower`` for one side).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import progress

FLOWER_VERSION = "1.42.0"
LITERT_VERSION = "2.3.0"  # the project's runtime, the same build on both sides
REQUIREMENTS = (f"flwr[simulation]=={FLOWER_VERSION}", f"ai-edge-litert=={LITERT_VERSION}")
BENCH = Path(__file__).resolve().parent
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # no reports to Flower's servers
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def summary(rounds: list[tuple[float, int]]) -> dict[str, Any]:
    """Per-round seconds and per-trained-device milliseconds from (seconds, trained) rounds."""
    seconds = [s for s, _ in rounds]
    trained = [n for _, n in rounds]
    warm = seconds[1:] or seconds
    return {
        "round_s": [round(s, 3) for s in seconds],
        "trained_per_round": trained,
        "per_round_s": round(statistics.fmean(seconds), 3),
        "per_round_warm_s": round(statistics.fmean(warm), 3),  # without the first round
        "per_device_ms": round(1000 * sum(seconds) / max(1, sum(trained)), 1),
        "per_device_warm_ms": round(1000 * sum(warm) / max(1, sum(trained[1:] or trained)), 1),
    }


# -- Flower's side (runs in Flower's venv) ------------------------------------------------------

_ACTOR: dict[str, Any] = {}  # per Ray actor process: the interpreter and the client partitions


def _signatures(model: str) -> dict[str, Any]:
    if "runners" not in _ACTOR:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=model, num_threads=1)
        _ACTOR["interpreter"] = interpreter
        _ACTOR["runners"] = {name: interpreter.get_signature_runner(name)
                             for name in ("train", "get_weights", "set_state")}  # fmt: skip
    runners: dict[str, Any] = _ACTOR["runners"]
    return runners


def _partition(client: int, examples: int, features: int) -> tuple[Any, Any, Any]:
    import numpy as np

    key = f"data:{client}"
    if key not in _ACTOR:
        rng = np.random.default_rng([16, client])
        x = rng.standard_normal((examples, features)).astype(np.float32)
        y = (rng.random(examples) < 0.2).astype(np.float32)  # 1 positive : 4 negatives
        _ACTOR[key] = (x, y, np.ones(examples, np.float32))
    data: tuple[Any, Any, Any] = _ACTOR[key]
    return data


def flower_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Run Flower's simulation of ``spec``; returns its rounds (seconds, trained clients)."""
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import fixedclipping_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
    from flwr.simulation import run_simulation

    model, steps, examples = spec["model"], spec["steps"], spec["examples"]
    parameters, features = spec["parameters"], spec["features"]

    class RankerClient(NumPyClient):  # type: ignore[misc]
        def __init__(self, client: int) -> None:
            self.client = client

        def fit(self, arrays: list[Any], config: dict[str, Any]) -> tuple[Any, int, dict[str, Any]]:
            run = _signatures(model)
            x, y, w = _partition(self.client, examples, features)
            weights = np.ascontiguousarray(arrays[0], dtype=np.float32)
            moments = np.zeros(2 * parameters + 1, np.float32)  # Adam restarts each round
            run["set_state"](state=np.concatenate([weights, moments]))
            rng = np.random.default_rng([self.client, int(config["round"])])
            lr = np.float32(3e-3)
            for _ in range(steps):
                pick = rng.choice(len(y), size=min(32, len(y)), replace=False)
                run["train"](x=x[pick], y=y[pick], w=w[pick], lr=lr)
            return [run["get_weights"]()["weights"]], len(y), {}

    def client_fn(context: Context) -> Any:
        return RankerClient(int(context.node_config["partition-id"])).to_client()

    marks: list[tuple[str, int, float, int]] = []

    class Timed(DifferentialPrivacyClientSideFixedClipping):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            marks.append(("start", server_round, time.perf_counter(), 0))
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            marks.append(("end", server_round, time.perf_counter(), len(results)))
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} clients failed")
            return out

    initial = np.asarray(spec["initial"], dtype=np.float32)
    clients = spec["clients"]

    def server_fn(context: Context) -> Any:
        fedavg = FedAvg(fraction_fit=spec["fraction"], fraction_evaluate=0.0,
                        min_fit_clients=1, min_evaluate_clients=0,
                        min_available_clients=clients,
                        initial_parameters=ndarrays_to_parameters([initial]),
                        on_fit_config_fn=lambda r: {"round": r})  # fmt: skip
        sampled = round(spec["fraction"] * clients)
        strategy = Timed(fedavg, noise_multiplier=1.0, clipping_norm=1.0,
                         num_sampled_clients=sampled)  # fmt: skip
        config = ServerConfig(num_rounds=spec["rounds"])
        return ServerAppComponents(strategy=strategy, config=config)

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": spec["workers"], "include_dashboard": False,
                             "_node_ip_address": "127.0.0.1", "logging_level": "ERROR",
                             "log_to_driver": False}}  # fmt: skip
    started = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=client_fn, mods=[fixedclipping_mod]),
                   num_supernodes=clients, backend_config=backend)  # fmt: skip
    total = time.perf_counter() - started
    starts = {r: t for kind, r, t, _ in marks if kind == "start"}
    rounds = [(t - starts[r], n) for kind, r, t, n in marks if kind == "end"]
    if len(rounds) != spec["rounds"]:
        raise RuntimeError(f"Flower ran {len(rounds)} of {spec['rounds']} rounds")
    import flwr

    return {"version": flwr.__version__, "total_s": round(total, 2), "rounds": rounds}


# -- Flower's venv --------------------------------------------------------------------------


def flower_venv() -> Path:
    """The python of a venv holding ``REQUIREMENTS``, built once per requirement set."""
    from sottovoce._venvs import VenvBuildFailed, cached_venv

    try:
        return cached_venv("flwr", REQUIREMENTS, log=progress)
    except VenvBuildFailed as failed:
        raise SystemExit(str(failed)) from None


def run_flower(spec: dict[str, Any]) -> dict[str, Any]:
    python = flower_venv()
    with tempfile.TemporaryDirectory() as tmp:
        request, answer = Path(tmp) / "spec.json", Path(tmp) / "flower.json"
        request.write_text(json.dumps(spec))
        # Run as the module ``flower`` (not __main__), importable by Ray's actor processes too,
        # so each actor keeps its interpreter and partitions between fits.
        code = "import sys, flower; flower.flower_main(sys.argv[1], sys.argv[2])"
        path = os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, **QUIET_ENV, "PYTHONPATH": path}
        progress(f"Flower {FLOWER_VERSION}: {spec['clients']} clients, {spec['rounds']} rounds")
        subprocess.run([str(python), "-c", code, str(request), str(answer)], check=True,
                       env=env, cwd=tmp, stdout=sys.stderr)  # fmt: skip
        result: dict[str, Any] = json.loads(answer.read_text())
    return result


def flower_main(request: str, answer: str) -> None:
    result = flower_side(json.loads(Path(request).read_text()))
    Path(answer).write_text(json.dumps(result))


# -- our side -------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    from sottovoce.policy import PrivacyMode
    from sottovoce.sim import SimulationConfig, simulate
    from sottovoce.sim import _federated as federated

    rounds: list[tuple[float, int]] = []
    original: Callable[..., list[dict[str, Any]]] = federated.run_rounds

    def timed(parts: Any, **kwargs: Any) -> list[dict[str, Any]]:
        started = time.perf_counter()
        outcomes = original(parts, **kwargs)
        if parts[0].service.pipeline == PrivacyMode.CENTRAL.value:  # the reranker's, central
            trained = sum(int(outcome.get("sampled", 0)) for outcome in outcomes)
            rounds.append((time.perf_counter() - started, trained))
        return outcomes

    federated.run_rounds = timed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = SimulationConfig(workdir=Path(tmp) / "sim", users=args.clients,
                                      sampling_rate=args.fraction, rounds=args.rounds,
                                      local_steps=args.steps, examples=args.examples,
                                      workers=args.workers)  # fmt: skip
            progress(f"ours: sottovoce simulate, {args.clients} users, {args.rounds} rounds")
            results = simulate(config)
    finally:
        federated.run_rounds = original
    phase = results["timings_s"].get("reranker_federated_dp")
    return {**summary(rounds),
            "simulate_per_round_s": None if phase is None else round(phase / args.rounds, 3),
            "timings_s": results["timings_s"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-flower", action="store_true")
    args = parser.parse_args()

    from sottovoce.device import Ranker
    from sottovoce.device._ranker import FEATURES, default_model_path

    ranker = Ranker.load()
    out: dict[str, Any] = {
        "setup": {"clients": args.clients, "fraction": args.fraction, "rounds": args.rounds,
                  "local_steps": args.steps, "batch": 32, "examples": args.examples,
                  "parameters": ranker.parameter_count, "workers": args.workers,
                  "model": "sottovoce ranker.tflite on ai-edge-litert, both sides"},
    }  # fmt: skip
    if not args.skip_flower:
        spec = {"model": str(default_model_path()), "clients": args.clients,
                "fraction": args.fraction, "rounds": args.rounds, "steps": args.steps,
                "examples": args.examples, "workers": args.workers,
                "parameters": ranker.parameter_count, "features": FEATURES,
                "initial": ranker.get_weights().tolist()}  # fmt: skip
        flower = run_flower(spec)
        out["flower"] = {"version": flower["version"], "total_s": flower["total_s"],
                         **summary([(s, n) for s, n in flower["rounds"]])}  # fmt: skip
    if not args.skip_ours:
        out["ours"] = run_ours(args)
    if "flower" in out and "ours" in out:
        ours, theirs = out["ours"], out["flower"]
        out["ratio"] = {
            name: round(ours[name] / theirs[name], 2)
            for name in ("per_round_s", "per_round_warm_s", "per_device_ms", "per_device_warm_ms")
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
