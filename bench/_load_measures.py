"""What ``bench/load.py`` measures its runs with: the region's database (a SQLite file, or a
throwaway PostgreSQL started and stopped here), and the CPU seconds the server, its event
loops, the database, the client and the whole machine use (Linux ``/proc``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sottovoce._pgserver import ThrowawayPostgres

__all__ = ["CpuSample", "Database"]


def _task_cpu(stat: Path) -> float | None:
    """User + system CPU seconds of a process or thread (Linux ``/proc``), else ``None``."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float | None:
    """CPU seconds every process on the machine has used since boot (``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait is busy
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))
    return busy / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The processes ``pid`` forked (serve's workers, PostgreSQL's backends)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _tree_cpu(pid: int | None) -> float | None:
    """CPU seconds of ``pid`` and the processes it forked that are alive now."""
    if pid is None:
        return None
    own = _task_cpu(Path(f"/proc/{pid}/stat"))
    if own is None:
        return None
    return own + sum(_task_cpu(Path(f"/proc/{c}/stat")) or 0.0 for c in _children(pid))


def _loops_cpu(server_pid: int) -> float | None:
    """CPU seconds of the main threads of the server's worker processes (uvicorn's event
    loops): the server itself with one worker, its forked workers with more."""
    workers = _children(server_pid) or [server_pid]
    times = [_task_cpu(Path(f"/proc/{w}/task/{w}/stat")) for w in workers]
    return None if None in times else sum(t for t in times if t is not None)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the server (all its processes), their event loops, the
    PostgreSQL server (all its processes; ``None`` on SQLite), this process and the machine."""

    NAMES: ClassVar[tuple[str, ...]] = ("server", "server_loop", "database", "client", "machine")

    server: float | None
    server_loop: float | None  # uvicorn's event loop runs on a worker process's main thread
    database: float | None
    client: float | None
    machine: float | None

    @classmethod
    def take(cls, server_pid: int, database_pid: int | None) -> CpuSample:
        return cls(
            _tree_cpu(server_pid),
            _loops_cpu(server_pid),
            _tree_cpu(database_pid),
            time.process_time(),
            _machine_busy(),
        )


class Database:
    """The region's database: a SQLite file in ``workdir``, or a throwaway PostgreSQL server on
    127.0.0.1 (``sottovoce._pgserver``: fsync and synchronous_commit on) started and stopped
    here."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend = backend
        self.target = str(workdir / "aggregator.db")
        self._server: ThrowawayPostgres | None = None

    def __enter__(self) -> Database:
        if self.backend == "postgres":
            self._server = ThrowawayPostgres(database="region_eu")
            self._server.start()
            self.target = self._server.url
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()

    def pid(self) -> int | None:
        """The PostgreSQL server's postmaster (``None`` on SQLite)."""
        if self._server is None:
            return None
        return int((self._server.data / "postmaster.pid").read_text().split()[0])
