"""The real PostgreSQL the backend tests run against (``sottovoce._pgserver`` and the fixtures
in conftest): on 127.0.0.1 only, behind a password, durable across a restart and a crash, a
fresh database per test, gone when it is closed; and one server for a whole run (``serve``)."""

from __future__ import annotations

import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from sottovoce._pgserver import (
    URL_ENV,
    BadDatabaseName,
    PostgresAt,
    PostgresNotFound,
    ThrowawayPostgres,
    find_bin_dir,
)

needs_pg = pytest.mark.skipif(
    os.environ.get("SOTTOVOCE_TEST_PG") == "off", reason="SOTTOVOCE_TEST_PG=off"
)


@pytest.fixture(scope="module")
def own() -> Iterator[ThrowawayPostgres]:
    """A server of this module's own, whose settings it checks (the run's may be anyone's)."""
    if os.environ.get("SOTTOVOCE_TEST_PG") == "off":
        pytest.skip("SOTTOVOCE_TEST_PG=off")
    with ThrowawayPostgres() as server:
        yield server


def _rows(url: str, query: str = "SELECT n FROM t ORDER BY n") -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode()).fetchall()


def _refused(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError:
        return True
    return False


@pytest.mark.parametrize("turn", [1, 2])
def test_each_test_gets_a_fresh_empty_database(pg_url: str, turn: int) -> None:
    # Both turns create the same table: the second would fail on a database the first had used.
    assert _rows(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (n integer PRIMARY KEY, weight double precision)")
        conn.execute("INSERT INTO t VALUES (%s, %s), (%s, %s)", (turn, 0.5, turn + 10, -1.25))
    assert _rows(pg_url, "SELECT n, weight FROM t ORDER BY n") == [(turn, 0.5), (turn + 10, -1.25)]


def test_the_backend_fixture_gives_a_database_to_open(backend: str, tmp_path: Path) -> None:
    if backend.startswith("postgresql://"):
        assert urlsplit(backend).hostname == "127.0.0.1"
        assert _rows(backend, "SELECT current_database()")[0][0] == urlsplit(backend).path[1:]
    else:
        assert Path(backend) == tmp_path / "region.db"
        with closing(sqlite3.connect(backend)) as conn:
            conn.execute("CREATE TABLE t (n integer)")
        assert Path(backend).is_file()


def test_a_second_database_is_isolated(own: ThrowawayPostgres) -> None:
    first, second = own.new_database("isolated_a"), own.new_database("isolated_b")
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE t (n integer)")
        conn.execute("INSERT INTO t VALUES (1)")
    assert _rows(first) == [(1,)]
    with pytest.raises(psycopg.errors.UndefinedTable):
        _rows(second)
    own.server.drop_database("isolated_b")
    assert _refused(second)
    assert _rows(first) == [(1,)]


def test_it_listens_on_loopback_only_behind_a_password(own: ThrowawayPostgres) -> None:
    assert _rows(own.url, "SHOW listen_addresses") == [("127.0.0.1",)]
    assert _rows(own.url, "SELECT host(inet_server_addr())") == [("127.0.0.1",)]
    # What the kernel has listening on the port: 127.0.0.1 only (no wildcard, no IPv6).
    listening = _listening(own.port)
    assert listening == {"0100007F"}, listening
    # The unix socket is in the server's own directory, not a shared one.
    (sockets,) = _rows(own.url, "SHOW unix_socket_directories")[0]
    assert Path(str(sockets)) == own.root / "socket"
    wrong = urlsplit(own.url)._replace(netloc=f"sottovoce:wrong@127.0.0.1:{own.port}").geturl()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong).close()
    stored = "SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = 'sottovoce'"
    assert _rows(own.url, stored) == [("SCRAM-SHA-256$",)]
    # Durability is what the fault tests are about.
    for setting in ("fsync", "synchronous_commit", "full_page_writes"):
        assert _rows(own.url, f"SHOW {setting}") == [("on",)], setting


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net shows them) that listen on TCP ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@needs_pg
def test_a_restart_keeps_what_was_committed_and_drops_what_was_in_flight(
    private_postgres: ThrowawayPostgres,
) -> None:
    pg, port = private_postgres, private_postgres.port
    with psycopg.connect(pg.url) as conn:
        conn.execute("CREATE TABLE t (n integer)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
    in_flight = psycopg.connect(pg.url)
    in_flight.execute("INSERT INTO t VALUES (3)")  # a transaction left open
    pg.restart()
    assert pg.port == port and pg.running
    assert _rows(pg.url) == [(1,), (2,)]
    with pytest.raises(psycopg.OperationalError):
        in_flight.execute("SELECT 1")
    in_flight.close()


@needs_pg
def test_a_killed_server_recovers_every_committed_transaction(
    private_postgres: ThrowawayPostgres,
) -> None:
    pg = private_postgres
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n integer)")
        for n in range(50):
            conn.execute("INSERT INTO t VALUES (%s)", (n,))
    pg.kill()
    assert not pg.running and _refused(pg.url)
    pg.start()
    assert _rows(pg.url) == [(n,) for n in range(50)]
    # It was a crash, not a clean stop: the server recovered from its write-ahead log.
    assert "automatic recovery in progress" in pg.log.read_text()
    pg.close()
    assert not pg.root.exists() and _refused(pg.url)
    pg.close()  # again: nothing left to do


@needs_pg
def test_serve_runs_one_server_until_it_is_told_to_stop(tmp_path: Path) -> None:
    env_file = tmp_path / "pg.env"
    server = subprocess.Popen(
        [sys.executable, "-m", "sottovoce._pgserver", "serve", "--env-file", str(env_file)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "serve wrote no URL"
            time.sleep(0.05)
        name, url = shlex.split(env_file.read_text())[0].split("=", 1)
        assert name == URL_ENV
        assert _rows(url, "SELECT current_database()") == [("sottovoce",)]
        created = PostgresAt(url).new_database("made_by_a_test")
        assert _rows(created, "SELECT 1") == [(1,)]
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert _refused(url)
    root = Path(err.rsplit("(", 1)[1].split(")")[0])
    assert root.name.startswith("sottovoce-pg-") and not root.exists()


def test_without_server_binaries_it_says_how_to_install_them(tmp_path: Path) -> None:
    with pytest.raises(PostgresNotFound, match=r"apt-get install postgresql"):
        find_bin_dir(path=str(tmp_path), roots=[tmp_path, tmp_path / "missing"])


def test_the_binaries_on_path_else_the_newest_installed_version(tmp_path: Path) -> None:
    for version, binaries in [("13", 3), ("16", 3), ("9.6", 3), ("17", 2), ("beta", 3)]:
        bin_dir = tmp_path / "lib" / version / "bin"
        bin_dir.mkdir(parents=True)
        for binary in ("initdb", "pg_ctl", "postgres")[:binaries]:  # 17 lacks a server
            (bin_dir / binary).write_text("#!/bin/sh\n")
            (bin_dir / binary).chmod(0o755)
    roots = [tmp_path / "lib"]
    assert find_bin_dir(path=str(tmp_path), roots=roots) == tmp_path / "lib" / "16" / "bin"
    on_path = tmp_path / "lib" / "13" / "bin"
    assert find_bin_dir(path=str(on_path), roots=roots) == on_path


def test_database_names_are_plain_identifiers() -> None:
    server = PostgresAt("postgresql://sottovoce:secret@127.0.0.1:5/sottovoce")
    assert server.url_for("round_7") == "postgresql://sottovoce:secret@127.0.0.1:5/round_7"
    for bad in ("Round", "7rounds", 'x"; DROP DATABASE sottovoce; --', "a" * 64, ""):
        with pytest.raises(BadDatabaseName, match="lower-case letters"):
            server.new_database(bad)  # refused before any connection is tried
    with pytest.raises(ValueError, match="database name"):
        ThrowawayPostgres(database="no-dashes")
