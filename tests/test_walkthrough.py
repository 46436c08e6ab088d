"""docs/walkthrough.md runs as it stands: its shell steps (on a free port instead of 8000), its
Python block, and its audit commands, from an empty directory to a released model."""

from __future__ import annotations

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


def test_the_walkthrough_ends_with_a_released_model(tmp_path: Path) -> None:
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
            else:
                assert "verified" in checked.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
