"""Every Python block in the README runs as it stands, in order, in an empty directory.

Blocks that talk to a region's aggregator read ``region/policy.json``, which ``sottovoce
aggregator keygen`` writes; the test makes those keys and serves that region on a free
loopback port first, as the README's shell lines do.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


@pytest.fixture
def region(tmp_path: Path) -> Iterator[str]:
    """Keys, a policy publishing them, and ``sottovoce aggregator serve`` on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "sottovoce", "aggregator"]
    subprocess.run([*cli, "keygen", "--region", "eu", "--out", "region", "--endpoint", url,
                    "--profile", "dev"], cwd=tmp_path, check=True, capture_output=True)  # fmt: skip
    env = {**os.environ, "SOTTOVOCE_ENROLLMENT_TOKENS": "app-token"}
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [*cli, "serve", "--region", "eu", "--policy", "region/policy.json", "--keys", "region",
         "--port", str(port), "--profile", "dev"],
        cwd=tmp_path, env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        wait_until_serving(url, server, tmp_path / "serve.log")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_readme_has_python_examples() -> None:
    assert len(python_blocks()) >= 4


def test_every_python_block_runs_in_order(tmp_path: Path, region: str) -> None:
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(python_blocks()), encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "stored 3 new events" in out and "1 dropped: already past" in out
    assert re.search(r"^t1 [-\d.]+ you liked this$", out, re.M)  # reranked with its events
    assert "trained on" in out
    assert re.search(r"^round eu-\S+: delta queued$", out, re.M)
    assert "acknowledged=1" in out and re.search(r"^model version [1-9]", out, re.M)
