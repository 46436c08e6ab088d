"""A real, throwaway PostgreSQL server on loopback, for the tests and the benchmarks.

The aggregator's PostgreSQL backend is tested against a real server. :class:`ThrowawayPostgres`
finds the server's binaries (``initdb`` and ``pg_ctl`` on PATH, else Debian's
``/usr/lib/postgresql/N/bin``, the newest N), initialises a cluster in a fresh temporary
directory and runs it listening on 127.0.0.1 only, on a free port, with its unix socket in a
directory of its own, password (SCRAM) authentication with a generated password, and fsync on:
the fault tests are about durability. On exit it is stopped and its directory removed::

    with ThrowawayPostgres() as pg:
        url = pg.new_database("round_a")  # postgresql://sottovoce:…@127.0.0.1:PORT/round_a
        pg.restart()  # stop -m fast, start again on the same port and data
        pg.kill()  # SIGKILL every server process, as a crash would
        pg.start()  # crash recovery; committed transactions are there

PostgreSQL refuses to run as root: when this process is root, the server's commands run as the
``postgres`` system user (Debian's package creates it) through ``runuser``.

``python -m sottovoce._pgserver serve --env-file FILE`` keeps one server for a whole test run
(``scripts/test``): it writes ``SOTTOVOCE_TEST_PG_URL=…`` to FILE once the server answers, and
stops and removes it on SIGTERM or SIGINT, or when the process that started it is gone.

This is a harness, not part of the product: its errors are not ``SottovoceError``s (no device or
operator meets them), but each says what went wrong and what to do::

    PostgresHarnessError   RuntimeError
    ├── PostgresNotFound   no initdb/pg_ctl: how to install them
    ├── PostgresFailed     a server command failed: its output and the log's tail
    └── BadDatabaseName    not a plain lower-case identifier (also a ValueError)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, LiteralString, Self
from urllib.parse import urlsplit

__all__ = [
    "URL_ENV",
    "BadDatabaseName",
    "PostgresAt",
    "PostgresFailed",
    "PostgresHarnessError",
    "PostgresNotFound",
    "ThrowawayPostgres",
    "find_bin_dir",
    "free_port",
]

URL_ENV: Final = "SOTTOVOCE_TEST_PG_URL"
SUPERUSER: Final = "sottovoce"
SERVER_USER: Final = "postgres"  # who runs the server when this process is root
DEBIAN_ROOT: Final = Path("/usr/lib/postgresql")
INSTALL_HINT: Final = (
    "install PostgreSQL's server (Debian/Ubuntu: apt-get install postgresql) or put the "
    "directory holding initdb and pg_ctl on PATH"
)
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_TIMEOUT = 60  # seconds a start or stop may take


class PostgresHarnessError(RuntimeError):
    """Base class of the throwaway server's errors."""

    code = "pg_harness_error"


class PostgresNotFound(PostgresHarnessError):
    code = "pg_not_found"


class PostgresFailed(PostgresHarnessError):
    code = "pg_failed"


class BadDatabaseName(PostgresHarnessError, ValueError):
    code = "pg_bad_database_name"


def find_bin_dir(*, path: str | None = None, roots: Sequence[Path] = (DEBIAN_ROOT,)) -> Path:
    """The directory of ``initdb`` and ``pg_ctl``: the one on ``path`` (default: PATH), else the
    newest ``ROOT/N/bin`` below ``roots``; else :class:`PostgresNotFound`."""
    on_path = shutil.which("initdb", path=path)
    if on_path is not None and _has_binaries(found := Path(on_path).resolve().parent):
        return found
    versions = [d for root in roots if root.is_dir() for d in root.iterdir()]
    usable = [d / "bin" for d in versions if _version(d.name) and _has_binaries(d / "bin")]
    if not usable:
        where = ", ".join(str(r) for r in roots)
        raise PostgresNotFound(f"no PostgreSQL server binaries on PATH nor in {where}: "
                               f"{INSTALL_HINT}")  # fmt: skip
    return max(usable, key=lambda b: _version(b.parent.name))


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".")) if re.fullmatch(r"\d+(\.\d+)*", name) else ()


def _has_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres"))


def _checked(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BadDatabaseName(f"database name {name[:80]!r}: use 1-63 lower-case letters, "
                              "digits and underscores, not starting with a digit")  # fmt: skip
    return name


@dataclass(frozen=True)
class PostgresAt:
    """A running server reached at ``url`` (a ``postgresql://`` URL of its default database, for
    a role that may create databases): databases come and go through it."""

    url: str

    def url_for(self, database: str) -> str:
        """The URL of ``database`` on this server, as this URL's role."""
        return urlsplit(self.url)._replace(path=f"/{_checked(database)}").geturl()

    def new_database(self, name: str) -> str:
        """Create the empty database ``name``; its URL."""
        self._admin("CREATE DATABASE {}", name)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, closing the connections still open to it."""
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def _admin(self, statement: LiteralString, database: str) -> None:
        import psycopg  # the aggregator extra
        from psycopg import sql

        query = sql.SQL(statement).format(sql.Identifier(_checked(database)))
        # On the maintenance database, so that any database (even the URL's own) can be dropped.
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(query)


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own in a temporary directory, served on 127.0.0.1.

    ``start`` (or ``with``) initialises it the first time and creates ``database``; ``url`` is
    that database's URL. ``stop``, ``restart`` and ``kill`` keep the data and the port; ``close``
    (the end of ``with``, or this process's exit) stops the server and removes everything. Its
    directory is made in ``parent`` (default: the temporary directory), e.g. a small disk.
    """

    def __init__(
        self, *, database: str = SUPERUSER, bin_dir: Path | None = None, parent: Path | None = None
    ) -> None:
        self.database = _checked(database)
        self.bin_dir = bin_dir or find_bin_dir()
        self._password = secrets.token_urlsafe(24)
        self._as_server = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
        self.root = Path(tempfile.mkdtemp(prefix="sottovoce-pg-", dir=parent))
        self._cleanup = weakref.finalize(self, _remove, self.bin_dir, self.root, self._as_server)
        self.port = 0
        self.running = False

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """The URL of ``database`` (the superuser's, with its password)."""
        return self.server.url

    @property
    def server(self) -> PostgresAt:
        return PostgresAt(f"postgresql://{SUPERUSER}:{self._password}@127.0.0.1:{self.port}/"
                          f"{self.database}")  # fmt: skip

    def new_database(self, name: str) -> str:
        """Create the empty database ``name``; its URL."""
        return self.server.new_database(name)

    def start(self) -> None:
        """Start the server (initialising the cluster the first time); returns once it answers."""
        if self.running:
            return
        if self.port:
            self._pg_ctl("start", "-l", str(self.log))
            self.running = True
            return
        self._initdb()
        for attempt in range(3):  # a free port may be taken between choosing and binding it
            self.port = free_port()
            self._configure()
            try:
                self._pg_ctl("start", "-l", str(self.log))
                break
            except PostgresFailed:
                if attempt == 2 or "could not bind" not in self._log_tail():
                    raise
        self.running = True
        self.server.new_database(self.database)

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``: transactions in flight roll back)."""
        if self.running:
            self._pg_ctl("stop", "-m", "fast")
            self.running = False

    def restart(self) -> None:
        """Stop the server and start it again, on the same port and data."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the server and every process of it, as a crash would, and wait until they
        are gone; ``start`` then recovers from the write-ahead log."""
        pid_file = self.data / "postmaster.pid"
        if not self.running or not pid_file.exists():
            self.running = False
            return
        postmaster = int(pid_file.read_text().split()[0])
        pids = [postmaster, *(pid for pid, (_, ppid) in _processes().items() if ppid == postmaster)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + _TIMEOUT
        # A zombie holds nothing the next start needs.
        while any(state != "Z" for pid, (state, _) in _processes().items() if pid in pids):
            if time.monotonic() > deadline:
                raise PostgresFailed(f"server processes {pids} outlived SIGKILL")
            time.sleep(0.02)
        # The dead postmaster stays a zombie until init reaps it (some inits poll, every few
        # seconds), and the next start takes a zombie's pid in the lock file for a live server.
        # Once it is reaped, the start itself clears the stale lock and the shared memory it
        # names; only if it is not, the lock of a server known to be dead is removed here.
        reaped = time.monotonic() + 10.0
        while Path(f"/proc/{postmaster}").exists():
            if time.monotonic() > reaped:
                pid_file.unlink(missing_ok=True)
                break
            time.sleep(0.02)
        self.running = False

    def close(self) -> None:
        """Stop the server at once and remove its directory (idempotent)."""
        self.running = False
        self._cleanup()

    # -- the server's commands -----------------------------------------------------------

    def _initdb(self) -> None:
        if self._as_server:
            shutil.chown(self.root, SERVER_USER, SERVER_USER)
        password = self.root / "password"
        password.write_text(self._password + "\n")
        if self._as_server:
            shutil.chown(password, SERVER_USER, SERVER_USER)
        try:
            # --no-sync: a cluster this new is rebuilt, not recovered, after a power loss; the
            # server itself runs with fsync on.
            who = ["-U", SUPERUSER, f"--pwfile={password}", "--auth=scram-sha-256"]
            how = ["--no-locale", "--encoding=UTF8", "--no-sync"]
            self._run("initdb", "-D", str(self.data), *who, *how)
        finally:
            password.unlink()
        (self.data / "pg_hba.conf").write_text(
            "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
            "local   all       all                 scram-sha-256\n"
            "host    all       all   127.0.0.1/32  scram-sha-256\n"
        )

    def _configure(self) -> None:
        sockets = self.root / "socket"
        sockets.mkdir(exist_ok=True)
        if self._as_server:
            shutil.chown(sockets, SERVER_USER, SERVER_USER)
        # Read after postgresql.conf, so these win; rewritten when a first start needs another port.
        (self.data / "postgresql.auto.conf").write_text(
            f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
            f"unix_socket_directories = '{sockets}'\n"
            "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n"
            # After a crash the server syncs its data directory before recovering: one syncfs
            # call instead of opening and syncing every file (1 s against 4 s here), same guarantee.
            "recovery_init_sync_method = syncfs\n"
            "max_connections = 200\n"
        )

    def _pg_ctl(self, action: str, *args: str) -> None:
        try:
            self._run("pg_ctl", action, "-D", str(self.data), "-w", "-t", str(_TIMEOUT), *args)
        except PostgresFailed as failed:
            raise PostgresFailed(f"{failed}\nserver log:\n{self._log_tail()}") from None

    def _run(self, binary: str, *args: str) -> None:
        _run([*self._as_server, str(self.bin_dir / binary), *args], cwd=self.root)

    def _log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _run(command: list[str], *, cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, env={**os.environ, "LC_ALL": "C"}, check=False,
                          capture_output=True, text=True, timeout=_TIMEOUT + 30)  # fmt: skip
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-3000:]
        raise PostgresFailed(f"{shlex.join(command)} exited with {done.returncode}:\n{output}")


def _remove(bin_dir: Path, root: Path, as_server: list[str]) -> None:
    """Stop the server if it runs (immediately: its data goes anyway), then remove ``root``."""
    if (root / "data" / "postmaster.pid").exists():
        command = [*as_server, str(bin_dir / "pg_ctl"), "stop", "-D", str(root / "data"),
                   "-m", "immediate", "-w"]  # fmt: skip
        subprocess.run(command, cwd=root, capture_output=True, check=False, timeout=_TIMEOUT)
    shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server about to start)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _processes() -> dict[int, tuple[str, int]]:
    """Every process's state letter and parent, by pid (Linux's /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):  # gone meanwhile
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            found[int(stat.parent.name)] = (state, int(ppid))
    return found


# -- one server for a whole test run -------------------------------------------------------


def serve(env_file: Path | None) -> int:
    """Run a throwaway server until SIGTERM/SIGINT/SIGHUP or until this process's parent is gone;
    its URL goes to ``env_file`` as ``SOTTOVOCE_TEST_PG_URL=...`` (else to stdout)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    with ThrowawayPostgres() as pg:
        line = f"{URL_ENV}={shlex.quote(pg.url)}\n"
        if env_file is None:
            print(line, end="", flush=True)
        else:
            # Whole or nothing: a reader waits for the file to be non-empty.
            partial = env_file.with_name(env_file.name + ".partial")
            partial.write_text(line)
            partial.replace(env_file)
        print(f"PostgreSQL for the tests on 127.0.0.1:{pg.port} ({pg.root})", file=sys.stderr)
        while not stop.wait(1.0) and os.getppid() == parent:
            pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        "python -m sottovoce._pgserver", description="A throwaway PostgreSQL on 127.0.0.1."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run one throwaway server until stopped")
    run.add_argument("--env-file", type=Path, help=f"write {URL_ENV}=URL here once it answers")
    args = parser.parse_args(argv)
    try:
        return serve(args.env_file)
    except PostgresHarnessError as error:
        print(f"error ({error.code}): {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
