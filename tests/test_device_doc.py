"""docs/device.md runs as it stands, and a device's base URL means one thing.

The page's Python blocks run in order, as one program, against the region its shell lines serve
(on a free loopback port, with 15-second rounds instead of 30). The base URL tests talk to the
same real service: an endpoint is the service's root, and one that ends in the API's ``/v1``
is refused before any request instead of becoming ``/v1/v1/...``.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import wait_until_serving

from sottovoce.policy import example_policy, load_policy
from sottovoce.sync import AggregatorUnavailable
from sottovoce.sync.transport import BadEndpoint, Uploader, api_url, enroll, fetch_round

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "device.md"
ROUND_MINUTES = "0.25"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), re.S | re.M)


@dataclass(frozen=True)
class Region:
    url: str
    home: Path  # holds region/policy.json, as the page's shell lines leave it

    @property
    def pinned(self) -> str:
        return load_policy(self.home / "region" / "policy.json").region("eu").key("signing").key


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    """The page's two shell lines, on a free port, with shorter rounds."""
    home = tmp_path_factory.mktemp("device-doc")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (block,) = _blocks("sh")
    keygen, serve = (shlex.split(line.replace("8000", str(port)))
                     for line in block.replace("\\\n", " ").splitlines())  # fmt: skip
    assert keygen[:3] == ["sottovoce", "aggregator", "keygen"], keygen
    subprocess.run([sys.executable, "-m", "sottovoce", *keygen[1:]], cwd=home, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    env = dict(w.split("=", 1) for w in serve if re.match(r"^[A-Z_]+=", w))
    argv = [w for w in serve if not re.match(r"^[A-Z_]+=", w)]
    assert argv[:3] == ["sottovoce", "aggregator", "serve"], argv
    log = (home / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "sottovoce", *argv[1:], "--port", str(port),
         "--round-minutes", ROUND_MINUTES],
        cwd=home, env={**os.environ, **env}, stdout=log, stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, home / "serve.log")
        yield Region(url, home)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_endpoint_is_the_services_root_and_v1_is_refused(region: Region) -> None:
    with httpx.Client(timeout=10) as client:
        for base in (region.url, region.url + "/"):
            spec = None
            for _ in range(100):
                spec = fetch_round(client, base_url=base, verify_key=region.pinned)
                if spec is not None:
                    break
                time.sleep(0.1)
            assert spec is not None and spec.region == "eu"
        # The mistake the example policy used to invite: a base URL that names the API.
        for wrong in (region.url + "/v1", region.url + "/v1/"):
            with pytest.raises(BadEndpoint, match=rf"ends in /v1.*use '{re.escape(region.url)}'"):
                fetch_round(client, base_url=wrong, verify_key=region.pinned)
            with pytest.raises(BadEndpoint):
                enroll(client, base_url=wrong, token="app-token",
                       device_public_key=b"\x01" * 32, period="2026-11-01")  # fmt: skip
            with pytest.raises(BadEndpoint):
                Uploader(client, base_url=wrong, outbox=None)  # type: ignore[arg-type]
        # What a device that called /v1/v1/round met: a 404 that is not the service's answer.
        # It is no answer at all, never "no round open".
        with pytest.raises(AggregatorUnavailable, match="HTTP 404"):
            fetch_round(client, base_url=region.url + "/elsewhere", verify_key=region.pinned)
    for bad in ("ftp://127.0.0.1", "http://", "http://127.0.0.1/?a=1", "127.0.0.1:8000"):
        with pytest.raises(BadEndpoint):
            api_url(bad, "/v1/round")


def test_policies_name_the_services_root(region: Region) -> None:
    for policy in (example_policy(), load_policy(region.home / "region" / "policy.json")):
        for each in policy.regions:
            endpoint = each.aggregator.endpoint
            assert api_url(endpoint, "/v1/round") == endpoint.rstrip("/") + "/v1/round"


def test_the_device_guide_runs_end_to_end(region: Region) -> None:
    script = region.home / "device_guide.py"
    script.write_text("\n".join(_blocks("python")), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=region.home, capture_output=True,
                          text=True, timeout=180, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert f"refused: the endpoint '{region.url}/v1' ends in /v1" in out
    assert "delta queued" in out  # the dev profile samples every device
    assert "enrolled for " in out and "1 delta acknowledged" in out
    assert re.search(r"^installed model version [1-9]", out, re.M), out
