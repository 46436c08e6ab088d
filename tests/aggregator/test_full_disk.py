"""A region whose disk fills up: uploads are answered 503 ``unavailable`` and none of them
counts; what was accepted before stays; once space is freed the devices' retries are accepted
and the round closes with the exact sum.

The database is on a small tmpfs mounted for the test (``mount -t tmpfs``, which needs root),
an SQLite file or a throwaway PostgreSQL server's whole data directory, served on a real
uvicorn on 127.0.0.1, and the disk is filled with a file until the kernel says ENOSPC. Without
permission to mount, the test is skipped and says so.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from scale_helpers import TOKEN, ServedRegion, delta
from service_helpers import Device, serve

from sottovoce._pgserver import ThrowawayPostgres
from sottovoce.aggregator import open_database
from sottovoce.sync import SealedDelta
from sottovoce.sync.transport import RetryPolicy

pytest.importorskip("opacus")

SIZES = {"sqlite": "8m", "postgres": "96m"}  # room for the database, then the filler
BEFORE, DURING = 4, 8  # uploads before the disk is full, and while it is
RETRY = RetryPolicy(attempts=2, initial=0.05, maximum=0.2)


@contextmanager
def small_disk(size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on a fresh directory (reachable by every user, so that
    PostgreSQL's server user can keep its data there); unmounted and removed after."""
    mount = Path(tempfile.mkdtemp(prefix="sottovoce-disk-"))
    try:
        command = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        done = subprocess.CompletedProcess([], 1, "", "no mount command")
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        gc.collect()  # the service's database connection, once unreferenced, is closed
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def fill(disk: Path) -> Path:
    """Write a file on ``disk`` until no byte more fits (ENOSPC); the file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    return filler


@contextmanager
def database_on(backend: str, disk: Path) -> Iterator[str]:
    """The region's database on ``disk``: an SQLite file, or a database of a PostgreSQL server
    whose data directory is there."""
    if backend == "sqlite":
        yield str(disk / "region.db")
        return
    if os.environ.get("SOTTOVOCE_TEST_PG") == "off":
        pytest.skip("SOTTOVOCE_TEST_PG=off: no PostgreSQL for this run")
    with ThrowawayPostgres(parent=disk) as pg:
        url = pg.new_database("region")
        conn = open_database(url)
        try:
            # Start a fresh write-ahead log segment (16 MB, allocated now): the server never
            # needs a new one during the test, which it could not create on a full disk.
            conn.execute("CHECKPOINT")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CREATE TABLE wal_probe (x INTEGER)")
        finally:
            conn.close()
        yield url


def post(client: httpx.Client, url: str, sealed: SealedDelta) -> tuple[int, str]:
    response = client.post(
        f"{url}/v1/rounds/{sealed.round_id}/deltas",
        content=sealed.to_wire(),
        headers={"Content-Type": "application/json", "Idempotency-Key": sealed.idempotency_key},
    )
    return response.status_code, response.json()["code"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_full_disk_answers_unavailable_and_keeps_what_was_accepted(
    backend: str, tmp_path: Path
) -> None:
    with small_disk(SIZES[backend]) as disk, database_on(backend, disk) as target:
        region = ServedRegion(tmp_path, target)
        spec = region.open_round()
        devices = [Device.seeded(f"disk/{i}") for i in range(BEFORE + DURING)]
        values = [delta(i, region.dim) for i in range(len(devices))]
        hpke = region.keys.hpke.public_key()
        sealed = [d.seal(spec, v, hpke) for d, v in zip(devices, values, strict=True)]
        with serve(region.app()) as url, httpx.Client(timeout=30) as client:
            for device in devices:
                device.enroll(client, url, spec, token=TOKEN, retry=RETRY)
            assert [post(client, url, s) for s in sealed[:BEFORE]] == [
                (200, "within_policy")
            ] * BEFORE
            before = region.state(spec.round_id)

            filler = fill(disk)
            answers = [post(client, url, s) for s in sealed[BEFORE:]]
            assert set(answers) <= {(200, "within_policy"), (503, "unavailable")}, answers
            failed = [i for i, a in enumerate(answers, BEFORE) if a == (503, "unavailable")]
            assert failed, "the full disk took every write"
            # Uploads are refused from the first one that needs space on (a page the
            # database must add): nothing after it got in.
            assert failed == list(range(failed[0], len(devices))), answers
            accepted = list(range(failed[0]))
            full = region.state(spec.round_id)
            assert full.count == len(accepted) >= before.count
            assert full.accepted_keys == sorted(sealed[i].idempotency_key for i in accepted)
            assert full.partial is not None
            np.testing.assert_allclose(full.partial.total,
                                       np.sum([values[i] for i in accepted], axis=0,
                                              dtype=np.float64), rtol=0, atol=1e-9)  # fmt: skip

            filler.unlink()  # space again: the same uploads, retried, are accepted
            assert [post(client, url, sealed[i]) for i in failed] == [(200, "within_policy")] * len(
                failed
            )
        state = region.state(spec.round_id)
        assert (state.state, state.count) == ("open", len(devices))
        ended = region.close_round(spec)
        assert sorted(ended) == [[], [spec.round_id]]
        closed = region.state(spec.round_id)
        assert (closed.state, closed.releases, closed.ledger) == ("published", [1], [spec.round_id])
        np.testing.assert_allclose(region.release_weights(1),
                                   region.expected_release(spec, values), rtol=0,
                                   atol=1e-6)  # fmt: skip
        report, size, indexes = region.verify_log()
        assert report.ok, report.problems
        assert indexes == list(range(size))
        decisions = region.decisions()
        assert decisions[("accept_delta", "within_policy")] == len(devices)
        assert sum(decisions.values()) == size  # a 503 left no decision behind
        if backend == "sqlite":
            with region.reading() as conn:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        print(
            f"{backend}: {len(accepted) - BEFORE} uploads fitted after the disk filled, "
            f"then {len(failed)} were answered 503 and accepted once retried"
        )
