"""What the benchmarks share: progress lines, percentiles, and the regional
aggregator run as an operator runs it (``sottovoce aggregator keygen`` and ``serve``, in a
process of its own).

Each benchmark prints one JSON object on stdout and its progress on stderr. They run as
``python bench/NAME.py``, which puts this folder first on ``sys.path``: they import this module
as ``_common``. At import it needs only the standard library, so ``bench/flower.py`` can import
it in Flower's own venv too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Service", "keygen", "percentile", "proc_status_kb", "progress"]

CLI = (sys.executable, "-m", "sottovoce", "aggregator")
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 <= q <= 1) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def proc_status_kb(pid: int | str, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (``VmRSS``, ``VmHWM``...); ``pid`` may be ``self``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def keygen(out: Path, *, region: str, policy: Path | None = None) -> Path:
    """``sottovoce aggregator keygen`` for ``region`` into ``out``; returns the policy it
    writes beside the keys (``policy`` with the region's new public keys, or the example's)."""
    given = [] if policy is None else ["--policy", str(policy)]
    subprocess.run([*CLI, "keygen", "--region", region, "--out", str(out), *given],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return out / "policy.json"


@dataclass
class Service:
    """``sottovoce aggregator serve`` for one region on 127.0.0.1, its output in ``log``."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        *,
        region: str,
        keys: Path,
        db: Path,
        log: Path,
        options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready: str = "/v1/health",
        timeout: float = 180.0,
    ) -> Service:
        """Start it with the keys and policy :func:`keygen` wrote to ``keys`` and wait until
        ``ready`` answers 200 (``/v1/round``: until a round is open)."""
        from sottovoce._pgserver import free_port  # here: Flower's venv imports this module

        port = free_port()
        command = [*CLI, "serve", "--region", region, "--policy", str(keys / "policy.json"),
                   "--keys", str(keys), "--db", str(db), "--port", str(port), *options]  # fmt: skip
        with log.open("wb") as out:
            process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=out,
                                       stderr=subprocess.STDOUT)  # fmt: skip
        service = cls(process, port, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if service.answers(ready) == 200:
                return service
            time.sleep(0.1)
        service.stop()
        raise RuntimeError(f"the aggregator did not come up; its log:\n{service.tail()}")

    def answers(self, path: str) -> int | None:
        """The status ``path`` answers a GET with (``None``: no answer)."""
        try:
            with _LOOPBACK.open(self.base + path, timeout=5) as answer:
                status: int = answer.status
                return status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the service finishes what it logs at stop), then SIGKILL after ``timeout``."""
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
