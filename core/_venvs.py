"""Side environments for comparisons: a cached venv holding exactly a few pinned requirements.

Two checks compare the project with software that cannot share its environment: the ranker on
``tflite-runtime`` (which needs numpy < 2; ``tests/device/test_tflite_runtime.py``) and the
Flower benchmark (``bench/flower.py``). Each runs its side in a venv built here once per
requirement set, Python version and machine, under ``$XDG_CACHE_HOME/sottovoce/venvs``
(``~/.cache`` by default), and reused after. Development tooling only: the library never calls
it, and it imports nothing beyond the standard library.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["VenvBuildFailed", "cached_venv", "venvs_root"]


class VenvBuildFailed(RuntimeError):
    """pip could not install the requirements; ``stderr`` is what it said."""

    def __init__(self, requirements: Sequence[str], stderr: str) -> None:
        super().__init__(f"pip could not install {' '.join(requirements)}:\n{stderr}")
        self.requirements = tuple(requirements)
        self.stderr = stderr


def venvs_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sottovoce" / "venvs"


def cached_venv(
    name: str,
    requirements: Sequence[str],
    *,
    timeout: float | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The python of a venv named ``name-<hash>`` holding exactly ``requirements``.

    Built on first use (pip of this interpreter installs binary wheels into it) and reused
    while its requirements, Python version and machine stay the same; two processes asking at
    once build it once (a file lock). Raises :class:`VenvBuildFailed`, leaving nothing behind,
    when pip fails; ``timeout`` bounds pip's run (seconds).
    """
    key = json.dumps([list(requirements), sys.version_info[:2], platform.machine()])
    root = venvs_root() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    python, ready = root / "bin" / "python", root / ".ready"
    if ready.exists():
        return python
    with _locked(root.with_name(root.name + ".lock")):
        if ready.exists():  # built by another process while this one waited
            return python
        shutil.rmtree(root, ignore_errors=True)
        if log is not None:
            log(f"building a venv in {root} ({' '.join(requirements)})")
        started = time.perf_counter()
        # No pip inside the venv (ensurepip costs seconds): this process's pip installs into it.
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
        install = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
             "--disable-pip-version-check", "--no-input", "--only-binary=:all:", *requirements],
            check=False, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if install.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise VenvBuildFailed(requirements, install.stderr)
        ready.write_text(key)
        if log is not None:
            log(f"built in {time.perf_counter() - started:.0f} s")
    return python


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
