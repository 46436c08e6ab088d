"""docs/walkthrough.md runs as it stands: its shell steps (on a free port instead of 8000), its
Python block, and its audit commands, from an empty directory to a released model, in under ten
minutes; and what it says about the privacy budget holds, through the command line."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import wait_until_serving

WALKTHROUGH = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"


def _blocks(kind: str) -> list[str]:
    text = WALKTHROUGH.read_text(encoding="utf-8")
    return re.findall(rf"^```{kind}\n(.*?)^```", text, re.S | re.M)


def _shell(block: str, port: int) -> list[tuple[dict[str, str], list[str]]]:
    """Each command of a shell block: its environment assignments and argv (on ``port``)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line.split("  #")[0].replace("8000", str(port)))
        env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
        argv = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
        if argv:
            assert argv[0] == "sottovoce", line
            if argv[1:3] == ["aggregator", "serve"]:
                argv += ["--port", str(port)]  # the page uses the default, 8000
            commands.append((env, [sys.executable, "-m", "sottovoce", *argv[1:]]))
    return commands


WALKTHROUGH_LIMIT_S = 600.0  # the promise: from nothing to a released model in ten minutes


def test_the_walkthrough_ends_with_a_released_model(tmp_path: Path) -> None:
    began = time.monotonic()  # from keygen to the last audit command, as a newcomer goes
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    keygen, serve, audit = _blocks("sh")
    ((_, make_keys),) = _shell(keygen, port)
    subprocess.run(make_keys, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    ((serve_env, run_server),) = _shell(serve, port)
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(run_server, cwd=tmp_path, env={**os.environ, **serve_env},
                              stdout=log, stderr=log)  # fmt: skip
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", server, tmp_path / "serve.log")
        (python,) = _blocks("python")
        script = tmp_path / "devices.py"
        script.write_text(python, encoding="utf-8")
        started = time.monotonic()
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, check=False)  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert time.monotonic() - started < 120
        for name in ("ana", "bo", "cy"):
            assert f"{name}: 1 delta acknowledged" in run.stdout
            assert re.search(rf"^{name}: installed model version [1-9]", run.stdout, re.M)
        for _, command in _shell(audit, port):
            checked = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                                     timeout=120, check=False)  # fmt: skip
            assert checked.returncode == 0, checked.stdout + checked.stderr
            if "query" in command:
                assert "deadline_reached" in checked.stdout
            elif "checkpoint" in command:
                assert checked.stdout.startswith("sottovoce.device/")
            else:
                assert checked.stdout.startswith("verified"), checked.stdout
                assert "no signature was checked" not in checked.stdout
        took = time.monotonic() - began
        print(f"the walkthrough took {took:.0f} s")
        assert took < WALKTHROUGH_LIMIT_S, f"the walkthrough took {took:.0f} s"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _keygen_dev(directory: Path) -> Path:
    ((_, make_keys),) = _shell(_blocks("sh")[0], 8000)
    subprocess.run(make_keys, cwd=directory, check=True, capture_output=True, timeout=120)
    return directory / "region" / "policy.json"


def test_the_walkthroughs_privacy_figures_are_the_accountants(tmp_path: Path) -> None:
    """What the page says ("one round costs ε ≈ 0.9", "the EU budget of 4 pays for eight rounds
    (ε 3.72)") is what the accountant says for the dev policy and the shipped model."""
    from sottovoce.aggregator import epsilon_of
    from sottovoce.device import PARAMETER_COUNT
    from sottovoce.policy import load_policy
    from sottovoce.sync import mechanism

    privacy = load_policy(_keygen_dev(tmp_path)).region("eu").privacy
    used = mechanism(privacy.mode, noise_multiplier=privacy.noise_multiplier,
                     sampling_rate=privacy.sampling_rate, dim=PARAMETER_COUNT)  # fmt: skip

    def spent(rounds: int) -> float:
        return epsilon_of([(used.noise_multiplier, used.sampling_rate, rounds, used.sensitivity)],
                          delta=privacy.delta, accountant=privacy.accountant)  # fmt: skip

    text = " ".join(WALKTHROUGH.read_text(encoding="utf-8").split())
    one = re.search(r"one round costs ε ≈ ([0-9.]+)", text)
    assert one is not None and round(spent(1), 1) == float(one.group(1))
    words = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    many = re.search(r"EU budget of 4 pays for (\w+) rounds \(ε ([0-9.]+)\)", text)
    assert many is not None
    rounds = words.index(many.group(1)) + 1
    assert round(spent(rounds), 2) == float(many.group(2)) and privacy.epsilon == 4.0
    assert spent(rounds) <= privacy.epsilon < spent(rounds + 1)


def test_a_budget_that_cannot_pay_for_one_round_stops_serve_with_the_arithmetic(
    tmp_path: Path,
) -> None:
    """The dev policy with an EU budget of 0.5: one round costs ε 0.93, so ``serve`` refuses to
    start (status 2) and says why, with the figures, instead of refusing every round later."""
    path = _keygen_dev(tmp_path)
    data = json.loads(path.read_text())
    data["regions"][0]["privacy"]["epsilon"] = 0.5
    path.write_text(json.dumps(data))
    ((env, run_server),) = _shell(_blocks("sh")[1], 8000)
    done = subprocess.run(run_server, cwd=tmp_path, env={**os.environ, **env, "COLUMNS": "300"},
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    said = " ".join(done.stderr.split())
    for part in ("[config_invalid] one round costs epsilon 0.93", "noise multiplier 2",
                 "sampling rate 1", "delta 0.01", "above region eu's budget of 0.5 per 30d",
                 "no round could ever open"):  # fmt: skip
        assert part in said, said
